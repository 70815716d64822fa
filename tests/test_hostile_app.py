"""Hostile input everywhere, in one session: every text input and every uploader of every page gets
the nastiest values, then every page must still render without an exception and the settings the
user had (model, r, alpha, strategy, custom targets) must be unchanged.

The inputs are found in each page's AppTest tree, not listed by hand: a new text input or uploader
fails `test_every_input_of_every_page_survives_hostile_values` until it has a plan here. AppTest
drives uploads through the real widget (streamlit 1.67 `FileUploader.set_value`); the server-side
check behind every uploader is also tested directly (`check_upload`, `read_upload`).
"""

from __future__ import annotations

import json
import math
import re
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from lora_core.datasets import MAX_UPLOAD_BYTES
from lora_core.runner import RunManager
from pages import common
from pages.common import resources

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
PAGES = [
    "overview", "rank", "alpha", "targets", "dropout", "search", "memory", "finetune", "experiments", "advisor",
    "inspect", "export",
]  # fmt: skip
SOURCES = ["Catalogue", "Hub id or path", "Upload config.json"]

LONG = "x" * 10_000
DEEP_JSON = "[" * 5_000 + "]" * 5_000
HOSTILE_TEXT = [
    "re:[",
    "re:(",
    "\x00",
    LONG,
    "../../etc/passwd",
    "/bin/ls",
    "/proc/self/environ",
    "\u202eevil\u202c \U0001f916 \u0645\u0631\u062d\u0628\u0627",  # RTL override, emoji, Arabic
    "",
    "   \t ",
    "[]",
    '{"r": "8"}',
    DEEP_JSON,
]
# The test's own settings, none of them a default, so a reset would show.
MODEL, R, ALPHA, CUSTOM_TARGETS = "facebook/opt-125m", 8, 24.0, "q_proj, v_proj"
EXPECTED = {"model": MODEL, "r": R, "alpha": ALPHA, "strategy": "Custom", "custom": CUSTOM_TARGETS}
EXPECTED["widgets"] = (R, ALPHA)
# Custom targets the engine refuses: the field keeps its last accepted value, with one error.
REFUSED_TARGETS = {"re:[", "re:(", "", "   \t "}


@dataclass
class Plan:
    """How to put a value into one input: which widgets to set first, and what commits it."""

    setup: dict = field(default_factory=dict)  # widget key -> value, set before the value
    commit: str | None = None  # a button key, "start" for the Fine-tune form, or None (a rerun)


TEXT_PLANS = {
    "lx_model_text": Plan({"lx_source": "Hub id or path"}, "lx_load"),
    "lx_custom_targets": Plan(),
    "lx_train_model_text": Plan({"lx_train_model_source": "Hub id or local path"}, "start"),
    "lx_train_hub_dataset": Plan({"lx_train_data_source": "Hub dataset id"}, "start"),
    "lx_train_name": Plan({"lx_train_model_source": "Embedded SmolLM2-135M-Instruct"}, "start"),
    "lx_rename_text_*": Plan(commit="lx_rename"),
    "lx_exp_model_text": Plan({"lx_exp_model_source": "Hub id or local path"}, "start"),
    "lx_exp_hub_dataset": Plan({"lx_exp_data_source": "Hub dataset id"}, "start"),
    "lx_exp_name": Plan({"lx_exp_model_source": "Embedded SmolLM2-135M-Instruct"}, "start"),
    "lx_exp_ray": Plan({"lx_exp_runner": "A Ray cluster"}, "start"),
    "lx_adv_model_text": Plan({"lx_adv_model_source": "Hub id or local path"}, "lx_adv_verify"),
    "lx_advv_hub_dataset": Plan({"lx_advv_data_source": "Hub dataset id"}, "lx_adv_verify"),
}
UPLOAD_PLANS = {
    "lx_upload": Plan({"lx_source": "Upload config.json"}),
    "lx_import_upload": Plan(),
    "lx_train_upload": Plan({"lx_train_data_source": "Upload JSONL/CSV"}, "start"),
    "lx_exp_upload": Plan({"lx_exp_data_source": "Upload JSONL/CSV"}, "start"),
    "lx_advv_upload": Plan({"lx_advv_data_source": "Upload JSONL/CSV"}, "lx_adv_verify"),
}
# Content each uploader would accept: hostile names travel with it, so the name alone is tested.
# The sidebar's config.json gets one that is refused (a valid one would switch the model).
BENIGN = {
    "lx_upload": b"[]",
    "lx_import_upload": json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}).encode(),
    "lx_train_upload": b"".join(
        json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}).encode() + b"\n" for i in range(20)
    ),
}
BENIGN["lx_exp_upload"] = BENIGN["lx_advv_upload"] = BENIGN["lx_train_upload"]


def plan_key(key: str) -> str:
    """A widget key as the plans name it (run ids in keys become `*`)."""
    return re.sub(r"_\d+$", "_*", key)


def hostile_uploads(key: str) -> list[tuple[str, bytes]]:
    rule = common.UPLOADS[key]
    suffix = rule.suffixes[0]
    contents = [
        bytes(range(256)) * 8,
        b"",
        b"  \n\t \n",
        b"[]",
        b'{"r": "8"}',
        DEEP_JSON.encode() * 20,
        b"{}" + b" " * (2 * rule.max_bytes),  # twice the cap: 2 MB to a 1 MB uploader
    ]
    names = ["../../etc/passwd", f"a/b{suffix}", "..", "n" * 300 + suffix, f"a\x00{suffix}"]
    names += [f"\u202ecod{suffix}", f"x{suffix}\x00.exe", "..\\..\\win.ini", "evil.exe"]
    return [(f"hostile{suffix}", data) for data in contents] + [(name, BENIGN[key]) for name in names]


class QueueOnly(RunManager):
    """Queues runs in the store and starts no worker: a hostile value that is a valid input (a run
    name such as `re:[`) may queue a run, and nothing in this test may train."""

    def __init__(self, store) -> None:
        self.store = store


@pytest.fixture
def session(tmp_path, monkeypatch) -> AppTest:
    monkeypatch.setenv("LORA_EXPLORER_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("LORA_EXPLORER_MODEL_ROOTS", str(tmp_path / "models"))  # a shared server's policy
    monkeypatch.setattr(resources, "RunManager", QueueOnly)
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    at.selectbox(key="lx_catalogue_choice").set_value(MODEL).run()
    at.slider(key="lx_r").set_value(R).run()
    at.number_input(key="lx_alpha").set_value(ALPHA).run()
    at.selectbox(key="lx_strategy").set_value("Custom").run()
    at.text_input(key="lx_custom_targets").set_value(CUSTOM_TARGETS).run()
    at.switch_page("pages/finetune.py").run()
    commit(at, "start")  # one queued run, so the Manage-a-run inputs exist
    assert any("queued" in s.value for s in at.success), [e.value for e in at.error]
    settled(at, "setup")
    return at


def settings_of(at: AppTest) -> dict:
    ok = at.session_state["lx_ok"]
    return {
        "model": at.session_state["lx_spec"].model_id,
        "r": ok["lx_r"],
        "alpha": ok["lx_alpha"],
        "strategy": ok["lx_strategy"],
        "custom": ok["lx_custom_targets"],
        "widgets": (at.slider(key="lx_r").value, at.number_input(key="lx_alpha").value),
    }


def settled(at: AppTest, what: str, custom: str = CUSTOM_TARGETS) -> None:
    """No exception element, no uncaught exception, one-line errors, and the user's settings as
    they were (`custom`: the custom targets now expected)."""
    assert not at.exception, (what, [e.value for e in at.exception])
    assert settings_of(at) == EXPECTED | {"custom": custom}, what
    assert all("\n" not in e.value for e in at.error), (what, [e.value for e in at.error])


def commit(at: AppTest, how: str | None) -> None:
    if how == "start":
        next(b for b in at.button if b.label == "Start").click().run()
    elif how:
        at.button(key=how).click().run()
    else:
        at.run()


# The training forms' fields (Fine-tune's, then the Experiments page's), each at a value it accepts:
# set before each of its plans, so the value under test is the only bad one and reaches its own check.
FORM_BENIGN = {
    "lx_train_model_source": "Embedded SmolLM2-135M-Instruct",
    "lx_train_data_source": "Built-in task",
    "lx_train_model_text": "",
    "lx_train_hub_dataset": "",
    "lx_train_name": "",
}
EXPERIMENT_BENIGN = {
    "lx_exp_model_source": "Embedded SmolLM2-135M-Instruct",
    "lx_exp_data_source": "Built-in task",
    "lx_exp_runner": "This server's worker",
    "lx_exp_model_text": "",
    "lx_exp_hub_dataset": "",
    "lx_exp_name": "",
    "lx_exp_ray": "",
}


def set_widgets(at: AppTest, plan: Plan) -> None:
    """The plan's setup; the form's fields first set to values it accepts."""
    form = EXPERIMENT_BENIGN if any(key.startswith("lx_exp_") for key in plan.setup) else FORM_BENIGN
    values = (form if plan.commit == "start" else {}) | plan.setup
    for key, value in values.items():
        (at.radio if key.endswith(("_source", "_runner")) else at.text_input)(key=key).set_value(value)
    if values and plan.commit != "start":
        at.run()  # a sidebar mode: shows the input under test (a form's fields wait for Start)


def inputs_of(at: AppTest) -> tuple[set[str], set[str]]:
    """The keys of every text input and uploader this page shows, the sidebar in each source mode."""
    texts, uploads = set(), set()
    for source in SOURCES:
        at.radio(key="lx_source").set_value(source).run()
        assert not at.exception, [e.value for e in at.exception]
        texts |= {w.key for w in at.text_input}
        uploads |= {w.key for w in at.file_uploader}
    assert None not in texts | uploads, "every text input and uploader needs a key"
    return texts, uploads


def tour(at: AppTest, after: str) -> None:
    for page in PAGES:
        at.switch_page(f"pages/{page}.py").run()
        settled(at, f"{page} page after {after}")


def test_every_input_of_every_page_survives_hostile_values(session: AppTest, tmp_path: Path) -> None:
    at, started = session, time.monotonic()
    found: dict[str, tuple[str, str]] = {}  # plan key -> (page, kind)
    for page in PAGES:
        at.switch_page(f"pages/{page}.py").run()
        texts, uploads = inputs_of(at)
        for key in texts:
            found.setdefault(plan_key(key), (page, "text"))
        for key in uploads:
            found.setdefault(plan_key(key), (page, "upload"))
    unplanned = {k for k, (_, kind) in found.items() if k not in (TEXT_PLANS if kind == "text" else UPLOAD_PLANS)}
    assert not unplanned, f"inputs without hostile values in this test: {sorted(unplanned)}"
    assert {k for k, (_, kind) in found.items() if kind == "upload"} <= set(common.UPLOADS)  # a server-side rule each
    assert set(found) == set(TEXT_PLANS) | set(UPLOAD_PLANS), "a plan for an input no page shows any more"

    accepted = CUSTOM_TARGETS
    for key, (page, kind) in sorted(found.items()):
        at.switch_page(f"pages/{page}.py").run()
        plan = TEXT_PLANS[key] if kind == "text" else UPLOAD_PLANS[key]
        set_widgets(at, plan)
        values = HOSTILE_TEXT if kind == "text" else hostile_uploads(key)
        for value in values:
            if plan.commit == "start":
                set_widgets(at, plan)
            if kind == "text":
                widget = next(w for w in at.text_input if plan_key(w.key) == key)
                widget.set_value(value)
            else:
                at.file_uploader(key=key).set_value((value[0], value[1], "application/octet-stream"))
            commit(at, plan.commit)
            what = f"{key} = {str(value)[:40]!r} on {page}"
            if key != "lx_custom_targets":
                settled(at, what)
            elif value in REFUSED_TARGETS:  # one error under the field; the last accepted targets stay
                settled(at, what, custom=accepted)
                assert len(at.sidebar.error) == 1 and f"still using {accepted}" in at.sidebar.error[0].value
            else:  # a (strange) list of names is the user's to count: "matches no module" at most
                settled(at, what, custom=value)
                accepted = value
        if key == "lx_custom_targets":  # back to the user's targets, with an invalid regex in the field
            at.text_input(key=key).set_value(CUSTOM_TARGETS).run()
            at.text_input(key=key).set_value("re:[").run()
            settled(at, "re:[ left in the custom targets")
        tour(at, key)
    # Uploads are stored by content hash under the data folder, whatever the client named them.
    stored = [p.name for p in (tmp_path / "data" / "uploads").iterdir()]
    assert stored and all(re.fullmatch(r"[0-9a-f]{16}\.(jsonl|json|csv)", n) for n in stored), stored
    assert not [p for p in tmp_path.rglob("*") if p.name in ("passwd", "win.ini", "b.jsonl", "cod.jsonl")]
    print(f"hostile sweep: {len(found)} inputs on {len(PAGES)} pages in {time.monotonic() - started:.0f} s")


def test_hostile_link_values_keep_the_defaults_with_a_short_notice() -> None:
    names = ["model", "r", "alpha", "dropout", "targets", "custom", "rslora", "dora", "bias"]
    for value in HOSTILE_TEXT:
        at = AppTest.from_file(APP, default_timeout=180)
        at.query_params.update(dict.fromkeys(names, value))
        at.run()
        assert not at.exception, (value[:40], [e.value for e in at.exception])
        ok = at.session_state["lx_ok"]
        assert (ok["lx_r"], ok["lx_alpha"], ok["lx_dropout"], ok["lx_strategy"]) == (16, 32.0, 0.05, "All attention")
        assert at.session_state["lx_spec"].model_id == "meta-llama/Llama-2-7b-hf"
        notices = [w.value for w in at.sidebar.warning]
        if value.strip():  # an empty value is no value
            assert len(notices) == 1 and "\n" not in notices[0] and len(notices[0]) < 1000, notices


@pytest.mark.parametrize("key", sorted(common.UPLOADS))
def test_every_uploader_refuses_an_oversize_payload_on_the_server(key: str) -> None:
    rule = common.UPLOADS[key]
    with pytest.raises(common.UploadError, match=rf"at most {rule.max_bytes / 1e6:g} MB"):
        common.check_upload(key, f"big{rule.suffixes[0]}", b" " * (rule.max_bytes + 1))

    class Oversize:  # what Streamlit hands the page: its size is known before the bytes are copied
        name, size = f"big{rule.suffixes[0]}", 2 * rule.max_bytes

        def getvalue(self) -> bytes:
            raise AssertionError("an oversize upload must be refused before it is read")

    with pytest.raises(common.UploadError, match="at most"):
        common.read_upload(key, Oversize())
    exact = common.check_upload(key, f"ok{rule.suffixes[0]}", b"{" + b" " * (rule.max_bytes - 2) + b"}")
    assert len(exact.data) == rule.max_bytes


def test_server_upload_cap_is_the_largest_uploader_cap() -> None:
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    # nothing else changed but the file watcher, which a served app does not need (README: bench_live)
    assert config == {"server": {"maxUploadSize": config["server"]["maxUploadSize"], "fileWatcherType": "none"}}
    largest = max(rule.max_bytes for rule in common.UPLOADS.values())
    assert largest == MAX_UPLOAD_BYTES
    assert config["server"]["maxUploadSize"] == math.ceil(MAX_UPLOAD_BYTES / 2**20)  # Streamlit's MB are MiB
    assert all(rule.max_mb <= config["server"]["maxUploadSize"] for rule in common.UPLOADS.values())


def test_pages_upload_and_catch_only_through_the_checked_paths() -> None:
    """A raw `st.file_uploader` skips the server-side check; `except Exception` / `except ValueError`
    hides bugs as messages (pages catch `InputError`)."""
    files = sorted((ROOT / "pages").rglob("*.py"))
    assert ROOT / "pages" / "common" / "uploads.py" in files
    for path in files:
        text = path.read_text()
        if path != ROOT / "pages" / "common" / "uploads.py":
            assert "file_uploader(" not in text, f"{path.name}: use pages.common.file_upload"
        assert not re.search(r"except\s+(Exception|BaseException|ValueError)\b\s*(as \w+)?:", text), path.name


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("../../x.jsonl", "x.jsonl"),
        ("a/b.csv", "b.csv"),
        ("..\\..\\c.json", "c.json"),
        ("x\x00.jsonl", "x.jsonl"),
        ("\u202ecod.jsonl", "cod.jsonl"),
        ("", "(unnamed file)"),
    ],
)
def test_display_names_are_never_paths(name: str, shown: str) -> None:
    assert common.display_name(name) == shown
    assert len(common.display_name("n" * 300 + ".jsonl")) == 80
    assert common.display_name("n" * 300 + ".jsonl").endswith(".jsonl")
