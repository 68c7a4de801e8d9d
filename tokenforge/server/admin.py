"""The admin API: /v1/organizations, /v1/keys, /v1/usage, /v1/invoices, /v1/audit. Every route needs a
key with the admin scope. An organisation's admin sees and manages only its own organisation; the
operator's admins (the organisation created on first start) manage every organisation, and only
they change limits, close months and record payments.
"""

from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tokenforge.control import audit, invoices, keys, organizations, usage
from tokenforge.control.errors import NotFoundError, PermissionDeniedError
from tokenforge.control.keys import Principal
from tokenforge.server.billing import Billing


MAX_STORED_INT = 2**63 - 1  # the store's integers are 64-bit (SQLite INTEGER, PostgreSQL BIGINT)


class AdminRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("*")
    @classmethod
    def storable_text(cls, value):
        """Strings reach the store, which holds only Unicode text: a lone surrogate (JSON's "\\ud800")
        is a 400 here rather than an encoding error there."""
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("must be valid Unicode text (it has a lone surrogate)") from None
        return value


class CreateOrganizationRequest(AdminRequest):
    name: str = Field(min_length=1, max_length=200)


class UpdateOrganizationRequest(AdminRequest):
    monthly_limit_micros: int | None = Field(default=None, ge=0, le=MAX_STORED_INT)
    use_tier_limit: bool = False  # drop a custom limit: back to the tier's


class CreateKeyRequest(AdminRequest):
    name: str = Field(default="", max_length=200)
    scopes: list[Literal["inference", "admin"]] = ["inference"]
    expires_in_days: int | None = Field(default=None, ge=1, le=3650)
    organization: str | None = None  # operator admins only: create it in this organisation


class CloseMonthRequest(AdminRequest):
    month: str = Field(pattern=r"^\d{4}-\d{2}$")
    organization: str | None = None  # None: every organisation with usage that month
    include_current: bool = False  # close the month that is still running (its later usage is not on it)


def make_admin_router(billing: Billing) -> APIRouter:
    plane = billing.plane

    async def admin(request: Request) -> Principal:
        return await billing.authorize(request, "admin")

    Admin = Annotated[Principal, Depends(admin)]
    router = APIRouter(prefix="/v1")

    def target(principal: Principal, org_id: str | None) -> str:
        """The organisation a route acts on: the caller's own, or any for an operator admin."""
        if org_id is None or org_id == principal.org_id:
            return principal.org_id
        if not principal.is_operator:
            raise PermissionDeniedError("An admin key manages its own organization only.", param="organization")
        return org_id

    def operator_only(principal: Principal) -> None:
        if not principal.is_operator:
            raise PermissionDeniedError("Only the operator's admin keys may do this.")

    @router.post("/organizations")
    def create_organization(body: CreateOrganizationRequest, principal: Admin) -> dict:
        operator_only(principal)
        with plane.store.transaction() as db:
            org = organizations.create_org(db, body.name, principal.actor, plane.ladder)
            return organizations.info(org, plane.ladder).to_dict()

    @router.get("/organizations")
    def list_organizations(principal: Admin) -> dict:
        with plane.store.transaction() as db:
            orgs = organizations.list_orgs(db) if principal.is_operator else [
                organizations.get_org(db, principal.org_id)]
            return {"object": "list", "data": [organizations.info(o, plane.ladder).to_dict() for o in orgs]}

    @router.get("/organizations/{org_id}")
    def get_organization(org_id: str, principal: Admin) -> dict:
        _visible(principal, org_id)
        with plane.store.transaction() as db:
            return organizations.info(organizations.get_org(db, org_id), plane.ladder).to_dict()

    @router.patch("/organizations/{org_id}")
    def update_organization(org_id: str, body: UpdateOrganizationRequest, principal: Admin) -> dict:
        operator_only(principal)
        with plane.store.transaction() as db:
            if body.use_tier_limit or body.monthly_limit_micros is not None:
                limit = None if body.use_tier_limit else body.monthly_limit_micros
                organizations.set_custom_limit(db, org_id, limit, principal.actor, plane.ladder)
            return organizations.info(organizations.get_org(db, org_id), plane.ladder).to_dict()

    @router.post("/organizations/{org_id}/delete-data")
    def delete_organization_data(org_id: str, principal: Admin) -> dict:
        _visible(principal, org_id)
        with plane.store.transaction() as db:
            return {"organization": org_id, "deleted": organizations.delete_org_data(db, org_id, principal.actor)}

    @router.post("/keys")
    def create_key(body: CreateKeyRequest, principal: Admin) -> dict:
        org_id = target(principal, body.organization)
        expires_at = None
        if body.expires_in_days is not None:
            expires_at = datetime.now(UTC) + timedelta(days=body.expires_in_days)
        with plane.store.transaction() as db:
            info, plaintext = keys.create_key(db, org_id, principal.actor, body.name, body.scopes, expires_at)
        return {**info.to_dict(), "key": plaintext}

    @router.get("/keys")
    def list_keys(principal: Admin, organization: str | None = None) -> dict:
        org_id = target(principal, organization)
        with plane.store.transaction() as db:
            return {"object": "list", "data": [k.to_dict() for k in keys.list_keys(db, org_id)]}

    @router.delete("/keys/{key_id}")
    def revoke_key(key_id: str, principal: Admin) -> dict:
        owner = None if principal.is_operator else principal.org_id
        with plane.store.transaction() as db:
            return keys.revoke_key(db, key_id, principal.actor, owner).to_dict()

    @router.get("/usage")
    def get_usage(principal: Admin, start: str | None = None, end: str | None = None,
                  organization: str | None = None, format: Literal["json", "csv"] = "json") -> Response:
        org_id = target(principal, organization)
        first, last = usage.parse_date_range(start, end, datetime.now(UTC).date())
        with plane.store.transaction() as db:
            rows = usage.daily_usage(db, org_id, first, last)
        if format == "csv":
            return _download(usage.to_csv(rows), "text/csv", f"usage-{org_id}-{first}-{last}.csv")
        return JSONResponse({"object": "usage", "organization": org_id, "start": first.isoformat(),
                             "end": last.isoformat(), "data": [r.to_dict() for r in rows],
                             "totals": usage.usage_totals(rows)})

    @router.get("/invoices")
    def list_invoices(principal: Admin, organization: str | None = None) -> dict:
        org_id = target(principal, organization)
        with plane.store.transaction() as db:
            return {"object": "list", "data": [i.to_dict() for i in invoices.list_invoices(db, org_id)]}

    @router.post("/invoices/close")
    def close_month(body: CloseMonthRequest, principal: Admin) -> dict:
        operator_only(principal)
        with plane.store.transaction() as db:
            if body.organization is not None:
                closed = [invoices.close_month(db, body.organization, body.month, principal.actor,
                                               allow_current=body.include_current)]
            else:
                closed = invoices.close_all(db, body.month, principal.actor, allow_current=body.include_current)
            return {"object": "list", "data": [i.to_dict() for i in closed]}

    @router.get("/invoices/{invoice_id}")
    def get_invoice(invoice_id: str, principal: Admin, format: Literal["json", "text", "csv"] = "json") -> Response:
        owner = None if principal.is_operator else principal.org_id
        with plane.store.transaction() as db:
            invoice = invoices.get_invoice(db, invoice_id, owner)
            org_name = organizations.get_org(db, invoice.org_id).name
        if format == "text":
            return PlainTextResponse(invoices.render_text(invoice, org_name))
        if format == "csv":
            return _download(invoices.render_csv(invoice), "text/csv", f"{invoice_id}.csv")
        return JSONResponse(invoice.to_dict())

    @router.post("/invoices/{invoice_id}/pay")
    def pay_invoice(invoice_id: str, principal: Admin) -> dict:
        operator_only(principal)
        with plane.store.transaction() as db:
            return invoices.mark_paid(db, invoice_id, principal.actor, plane.ladder).to_dict()

    @router.get("/audit")
    def list_audit(principal: Admin, organization: str | None = None, action: str | None = None) -> dict:
        org_id = target(principal, organization)
        with plane.store.transaction() as db:
            return {"object": "list", "data": [e.to_dict() for e in audit.list_events(db, org_id, action)]}

    return router


def _visible(principal: Principal, org_id: str) -> None:
    """A foreign organisation is 'not found' to a non-operator (its existence is not revealed)."""
    if not principal.is_operator and org_id != principal.org_id:
        raise NotFoundError(f"no organization {org_id}", param="organization")


def _download(text: str, media_type: str, filename: str) -> Response:
    return Response(text, media_type=media_type, headers={"content-disposition": f'attachment; filename="{filename}"'})
