"""The fixed prompt sets of `tokenforge bench`: chat conversations generated from a seeded RNG, so
every run (and every server measured) gets exactly the same requests. Sizes are in words; with
SmolLM2's tokenizer and chat template they come to about the token counts in PROMPT_SETS.
"""

import random

# name -> what it is (prompt tokens with SmolLM2's tokenizer and chat template, measured)
PROMPT_SETS = {
    "short": "short chat: one user message, 113-117 prompt tokens",
    "long": "long context: a document and a question about it, 1,480-1,505 prompt tokens",
    "shared": "shared system prompt: the same system message (~930 tokens), then a question of its own; "
              "~1,000 prompt tokens",
}
SHORT_NUM_WORDS = 70
LONG_NUM_WORDS = 1_320
SHARED_SYSTEM_NUM_WORDS = 860
SHARED_QUESTION_NUM_WORDS = 24

_WORDS = (
    "the a an of to in on for with from by about over under after before between through during "
    "river city market garden station library harbour mountain valley forest village bridge road "
    "school kitchen window table letter story music picture engine machine signal network program "
    "system process memory record answer question reason method result problem example number "
    "morning evening winter summer spring autumn weather light water stone paper metal glass "
    "teacher student farmer doctor writer builder driver painter sailor baker pilot engineer "
    "walks reads builds finds carries opens closes watches writes sends keeps brings follows "
    "explains describes measures compares repairs collects prepares remembers changes "
    "quiet bright narrow ancient careful simple heavy gentle sudden distant early late small large "
    "slowly quickly carefully often never always together again almost nearly rather "
    "and but because while although when where which that so then also"
).split()
_QUESTIONS = (
    "Summarise the text above in three sentences.",
    "What is the main idea of the text above?",
    "List the people mentioned above and what each of them does.",
    "Which places does the text mention, and in what order?",
)


def _sentences(rng: random.Random, num_words: int) -> str:
    """About `num_words` words of sentences of 8-18 words each."""
    sentences, count = [], 0
    while count < num_words:
        length = min(rng.randint(8, 18), max(num_words - count, 3))
        words = [rng.choice(_WORDS) for _ in range(length)]
        sentences.append(" ".join(words).capitalize() + ".")
        count += length
    return " ".join(sentences)


def make_prompt_set(name: str, num_prompts: int, seed: int | str = 0) -> list[list[dict]]:
    """`num_prompts` chat conversations of the set `name` (see PROMPT_SETS). The same name, count and
    seed give the same conversations. Conversations share no prefix beyond the chat template's,
    except the system message of "shared", which is the same for every seed (a hot system prompt)."""
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; choose one of {', '.join(PROMPT_SETS)}")
    rng = random.Random(f"tokenforge-bench-{name}-{seed}")
    if name == "shared":
        system = "You are the assistant of a travel company. Company handbook: " + \
                 _sentences(random.Random("tokenforge-bench-shared-system"), SHARED_SYSTEM_NUM_WORDS)
        return [[{"role": "system", "content": system},
                 {"role": "user", "content": f"Question {seed}-{i}: {_sentences(rng, SHARED_QUESTION_NUM_WORDS)}"}]
                for i in range(num_prompts)]
    conversations = []
    for i in range(num_prompts):
        if name == "short":
            content = f"Request {seed}-{i}. Continue this story: {_sentences(rng, SHORT_NUM_WORDS)}"
        else:
            content = f"Document {seed}-{i}:\n{_sentences(rng, LONG_NUM_WORDS)}\n\n{rng.choice(_QUESTIONS)}"
        conversations.append([{"role": "user", "content": content}])
    return conversations
