"""PATCH /admin/keys/{id}: the admin API's side of the console's "set budgets and limits" (same checks)."""

from __future__ import annotations

from gateway_console.conftest import Stack


def test_patch_changes_only_the_given_fields_with_the_create_checks(stack: Stack) -> None:
    admin = stack.gateway.admin
    created = admin.post("/admin/keys", json={"name": "patch-me", "team": "t", "rpm": 5}).json()
    r = admin.patch(f"/admin/keys/{created['id']}", json={"budget_usd": 1.5, "tpm": 100})
    assert r.status_code == 200, r.text
    assert (r.json()["name"], r.json()["team"], r.json()["rpm"], r.json()["budget_usd"], r.json()["tpm"]) == \
        ("patch-me", "t", 5, 1.5, 100)
    for body, param in (({"rpm": 0}, "rpm"), ({"data_class": "secret"}, "data_class"),
                        ({"models": ["nope"]}, "models"), ({"colour": "red"}, "colour")):
        bad = admin.patch(f"/admin/keys/{created['id']}", json=body)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text
    assert admin.patch("/admin/keys/nokey", json={"rpm": 1}).status_code == 404
    assert admin.patch(f"/admin/keys/{created['id']}", content=b"[1]").status_code == 400
    listed = {k["id"]: k for k in admin.get("/admin/keys").json()["data"]}
    assert listed[created["id"]]["rpm"] == 5 and listed[created["id"]]["budget_usd"] == 1.5  # refusals changed nothing
