"""The side-by-side peer comparisons' own logic (`xlstm_eqx.tools.peers`), without the peers:
alternation order, medians and ratio, and the "peer not installed" path."""

import statistics

import pytest

from xlstm_eqx.tools import bench, peers


def _scripted_timer(times: dict[str, list[float]], log: list[str]):
    """A timer that logs which side it timed and returns that side's next scripted seconds."""

    def timer(fn, calls):
        name = fn()
        log.append(f"time {name} x{calls}")
        return times[name].pop(0)

    return timer


def test_alternate_runs_warmups_then_alternates_and_takes_medians():
    log = []
    times = {"ours": [0.5, 0.1, 0.3, 0.2], "peer": [0.9, 0.6, 0.4, 0.8]}

    def side(name):
        def call():
            log.append(name)
            return name

        return call

    result = peers.alternate(
        side("ours"),
        side("peer"),
        rounds=4,
        calls=7,
        warmup=2,
        timer=_scripted_timer({k: list(v) for k, v in times.items()}, log),
    )
    # two warm-up calls of each side (ours first), then ours/peer strictly alternating
    assert log[:4] == ["ours", "peer", "ours", "peer"]
    timed = [entry for entry in log[4:] if entry.startswith("time")]
    assert timed == ["time ours x7", "time peer x7"] * 4
    assert result.ours_rounds == tuple(times["ours"])
    assert result.peer_rounds == tuple(times["peer"])
    assert result.ours_s == pytest.approx(statistics.median(times["ours"]))  # 0.25
    assert result.peer_s == pytest.approx(statistics.median(times["peer"]))  # 0.7
    assert result.ratio == pytest.approx(0.7 / 0.25)  # > 1: ours is faster


def test_alternate_default_timer_measures_wall_time():
    import time

    result = peers.alternate(
        lambda: time.sleep(0.002), lambda: time.sleep(0.02), rounds=3, calls=2, warmup=0
    )
    assert len(result.ours_rounds) == len(result.peer_rounds) == 3
    assert result.ours_s >= 0.002 and result.peer_s >= 0.02
    assert result.ratio > 1


@pytest.mark.parametrize("rounds,calls,warmup", [(0, 1, 0), (1, 0, 0), (1, 1, -1)])
def test_alternate_rejects_bad_counts(rounds, calls, warmup):
    with pytest.raises(ValueError, match="alternate"):
        peers.alternate(lambda: 0, lambda: 0, rounds=rounds, calls=calls, warmup=warmup)


def _fake_checkout(tmp_path, monkeypatch, source: str):
    (tmp_path / "benchmarks" / "peers").mkdir(parents=True)
    (tmp_path / "benchmarks" / "peers" / "fake_peer.py").write_text(source)
    monkeypatch.setenv("XLSTM_EQX_REPO", str(tmp_path))


def test_load_peer_not_installed_gives_a_note(tmp_path, monkeypatch):
    source = "def import_peer():\n    import no_such_peer_package_xyz\n"
    _fake_checkout(tmp_path, monkeypatch, source)
    module, note = peers.load_peer("fake_peer", "the fake peer")
    assert module is None
    assert note is not None and "\n" not in note and note.startswith("# the fake peer")
    assert "ModuleNotFoundError" in note and "no_such_peer_package_xyz" in note


def test_load_peer_missing_runner_gives_a_note(tmp_path, monkeypatch):
    _fake_checkout(tmp_path, monkeypatch, "def import_peer():\n    return None\n")
    module, note = peers.load_peer("not_there", "another peer")
    assert module is None and note is not None and "FileNotFoundError" in note


def test_load_peer_installed(tmp_path, monkeypatch):
    _fake_checkout(tmp_path, monkeypatch, "MARK = 7\ndef import_peer():\n    return None\n")
    module, note = peers.load_peer("fake_peer", "the fake peer")
    assert note is None and module.MARK == 7


def test_no_peer_means_no_rows_and_only_the_note(capsys):
    assert peers.compare_train(None, seq_len=32, peak_flops=1e9) == []
    assert peers.compare_generate(None) == []
    peers.print_train_comparison([], "# xlstm-jax not importable (X): its rows are skipped")
    peers.print_generate_comparison([], None)
    assert capsys.readouterr().out == "# xlstm-jax not importable (X): its rows are skipped\n"


def testpeer_section_turns_a_failing_peer_into_a_note(tmp_path, monkeypatch, capsys):
    _fake_checkout(tmp_path, monkeypatch, "def import_peer():\n    return None\n")

    def compare(peer):
        raise RuntimeError("peer exploded\nsecond line")

    shown = []
    bench.peer_section("fake_peer", "the fake peer", compare, lambda r, n: shown.append((r, n)))
    assert shown == [([], shown[0][1])]
    assert "RuntimeError: peer exploded" in shown[0][1] and "\n" not in shown[0][1]


@pytest.mark.slow
def test_compare_train_with_a_stand_in_peer(capsys):
    """The train comparison's plumbing on the tiny Llama, with our own step standing in for the
    peer's (so both sides have the same parameter count and the ratio is about 1)."""

    class StandIn:
        @staticmethod
        def reference_train_step(config, seq_len, batch_size, train):
            _, step, n = peers.our_train_step("llama", "tiny", seq_len, batch_size)
            assert train.seq_len == seq_len and train.grad_clip is not None
            return step, n

    rows = peers.compare_train(
        StandIn(), seq_len=16, size="tiny", models=("llama",), peak_flops=1e9, rounds=3, calls=1
    )
    (row,) = rows
    assert row["params"] == row["peer_params"] > 0
    assert row["ms"] > 0 and row["peer_ms"] > 0 and row["rounds"] == 3
    assert row["ratio"] == pytest.approx(row["peer_ms"] / row["ms"])
    assert row["mfu"] / row["peer_mfu"] == pytest.approx(row["ratio"])
    peers.print_train_comparison(rows)
    out = capsys.readouterr().out
    assert "ratio = xlstm-jax / ours" in out
    assert out.splitlines()[-1].split()[:2] == ["llama", "llama"]


@pytest.mark.slow
def test_compare_generate_with_a_stand_in_peer(capsys):
    """The generation comparison's plumbing on the tiny xLSTM, with our own greedy decode standing
    in for transformers' (so the tokens agree everywhere)."""
    import jax.numpy as jnp

    class StandIn:
        @staticmethod
        def hf_model_from_ours(model, config):
            return model, 123

        @staticmethod
        def greedy_decoder(model, prompt, new_tokens):
            # the same jitted prefill and decode as ours (compiled once for both sides)
            logits, state = peers.jit_prefill(model, jnp.asarray(prompt), 12 + new_tokens)
            return lambda: peers.greedy_decode(model, state, logits, new_tokens)

    rows = peers.compare_generate(
        StandIn(), context=12, batch_sizes=(2,), new_tokens=4, size="tiny", rounds=3, calls=1
    )
    (r,) = rows
    assert r["batch_size"] == 2 and r["params"] > 0 and r["peer_params"] == 123
    assert r["same_tokens"] == 1.0
    assert r["ms_per_token"] > 0 and r["peer_ms_per_token"] > 0
    assert r["ratio"] == pytest.approx(r["peer_ms_per_token"] / r["ms_per_token"])
    peers.print_generate_comparison(rows)
    last = capsys.readouterr().out.splitlines()[-1].split()
    assert last[0] == "2" and last[-1] == "100%"
