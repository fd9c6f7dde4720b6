"""The dev EHR's few HTML pages (launcher, patient picker, errors): self-contained, no CDN,
every value escaped."""

from __future__ import annotations

from html import escape
from typing import Any
from urllib.parse import urlencode

BANNER = "DEVELOPMENT TOOL — not for production"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 0; color: #1a1a1a; background: #fafafa; }
.banner { background: #b00020; color: #fff; font-weight: 700; padding: .6rem 1rem;
  letter-spacing: .03em; }
main { max-width: 56rem; margin: 1.5rem auto; padding: 0 1rem; }
table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { text-align: left; padding: .45rem .6rem; border-bottom: 1px solid #ddd; }
a, button { font: inherit; }
button { padding: .3rem .8rem; cursor: pointer; }
.muted { color: #555; }
code { background: #eee; padding: 0 .25rem; }
"""


def _page(title: str, body: str) -> str:
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        # No favicon: a browser would otherwise ask for /favicon.ico and log a 404.
        "<link rel='icon' href='data:,'>"
        f"<title>{escape(title)} · cxr dev EHR</title><style>{_STYLE}</style></head><body>"
        f"<div class='banner' role='alert'>{escape(BANNER)}</div>"
        f"<main><h1>{escape(title)}</h1>{body}</main></body></html>"
    )


def patient_name(patient: dict[str, Any]) -> str:
    for name in patient.get("name", []):
        if name.get("text"):
            return str(name["text"])
        parts = [*name.get("given", []), name.get("family", "")]
        text = " ".join(p for p in parts if p)
        if text:
            return text
    return "(no name)"


def _patient_cells(patient: dict[str, Any]) -> str:
    ident = next((i.get("value", "") for i in patient.get("identifier", [])), "")
    return (
        f"<td>{escape(patient_name(patient))}</td><td><code>{escape(patient.get('id', ''))}</code>"
        f"</td><td>{escape(patient.get('gender', ''))}</td>"
        f"<td>{escape(patient.get('birthDate', ''))}</td><td>{escape(ident)}</td>"
    )


_HEAD = (
    "<thead><tr><th scope='col'>name</th><th scope='col'>id</th><th scope='col'>gender</th>"
    "<th scope='col'>birth date</th><th scope='col'>identifier</th><th scope='col'></th></tr>"
    "</thead>"
)


def launcher_page(
    patients: list[dict[str, Any]],
    *,
    fhir_base: str,
    app_launch: str,
    selected: str | None,
    user: str,
) -> str:
    rows = []
    for p in patients:
        link = "/launch/ehr?" + urlencode({"patient": p.get("id", "")})
        rows.append(f"<tr>{_patient_cells(p)}<td><a href='{escape(link)}'>EHR launch</a></td></tr>")
    if not rows:
        what = f"patient {selected!r}" if selected else "patients"
        rows.append(
            f"<tr><td colspan='6' class='muted'>No {escape(what)} in the FHIR server.</td></tr>"
        )
    standalone = app_launch + "?" + urlencode({"iss": fhir_base})
    body = (
        "<p>Each <em>EHR launch</em> mints a launch token bound to the patient and opens "
        f"<code>{escape(app_launch)}</code> with <code>iss</code> and <code>launch</code>.</p>"
        "<p><a id='user-launch' href='/launch/ehr'>Worklist launch: all recent studies</a> "
        f"— no patient in context; signed in as <code>{escape(user)}</code>, the app is "
        "granted <code>user/</code> read scopes across patients.</p>"
        f"<table>{_HEAD}<tbody>{''.join(rows)}</tbody></table>"
        f"<p class='muted'>FHIR base (a proxy in front of HAPI): <code>{escape(fhir_base)}</code>"
        f"<br>Standalone launch: <a href='{escape(standalone)}'>{escape(standalone)}</a></p>"
    )
    return _page("Launch the app", body)


def picker_page(patients: list[dict[str, Any]], *, request_id: str, client_id: str) -> str:
    rows = []
    for p in patients:
        pid = escape(p.get("id", ""))
        rows.append(
            f"<tr>{_patient_cells(p)}<td><button type='submit' name='patient' value='{pid}'>"
            "Choose</button></td></tr>"
        )
    if not rows:
        rows.append("<tr><td colspan='6' class='muted'>No patients in the FHIR server.</td></tr>")
    body = (
        f"<p><code>{escape(client_id)}</code> asks for access to one patient's record.</p>"
        "<form method='post' action='/auth/authorize/select'>"
        f"<input type='hidden' name='request' value='{escape(request_id)}'>"
        f"<table>{_HEAD}<tbody>{''.join(rows)}</tbody></table>"
        "<p><button type='submit' name='action' value='deny'>Deny</button></p></form>"
    )
    return _page("Choose a patient", body)


def error_page(title: str, message: str) -> str:
    return _page(title, f"<p>{escape(message)}</p>")
