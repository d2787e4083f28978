"""Elastic training under torchrun on the CPU (gloo): a killed worker or a killed launcher costs a
restart, never the run; run.resume=auto; damaged and changed checkpoints; exact loader resume;
the plain progress lines of a non-terminal output.

The torchrun tests compare final weights bit for bit with an uninterrupted run of the same config:
on the CPU in fp32 training is deterministic, so any difference in the sample order, the
augmentation, the schedule or the optimiser state after a restart shows. Each prints the restart
cost it measured (seconds from the kill to the first step finished after it).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from c2f_fast import checkpoint as ckpt
from c2f_fast.config import ConfigError, load_config
from c2f_fast.data import build_loader, load_voc, make_synthetic
from c2f_fast.train import TrainStep, _PlainProgress, _progress, train

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 12  # 96 images, 2 processes x batch 4
EPOCHS = 2


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("synth") / "set", n_train=96, n_test=16, image_size=32)


def overrides(root, out, **extra):
    values = {
        "model.variant": "lstm_lg", "model.backbone": "tiny", "model.image_size": 32, "model.steps": 3,
        "model.hidden": 16, "model.embed": 8, "model.attn": 16,
        "data.format": "voc", "data.root": str(root), "data.batch_size": 4, "data.loader": "torch",
        "data.workers": 0, "data.crop_scale": "[0.5, 1.0]",
        "optim.lr": 3e-3, "optim.epochs": EPOCHS, "optim.warmup_epochs": 0.5,
        "run.out": str(out), "run.progress": "false", "run.log_every": 1, "run.checkpoint_every": 3,
        "run.eval_every": EPOCHS, "run.dist_timeout": 60,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def step_records(run_dir):
    lines = (Path(run_dir) / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "step"]


def final_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(Path(run_dir) / ckpt.FINAL_WEIGHTS)


def assert_same_weights(a, b):
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"weights differ from the uninterrupted run's in {differ[:5]}"


def checkpoint_state(path):
    try:
        return torch.load(path, weights_only=True)
    except Exception:  # not there yet, or being replaced
        return None


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- torchrun helpers
def torchrun(*args, log=None, **env_extra):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env_extra}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], cwd=REPO, env=env,
                            stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def workers(launcher_pid):
    """{rank: pid} of the worker processes a torchrun launcher started (its children)."""
    out = {}
    try:
        children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    except OSError:
        return out
    for pid in map(int, children):
        try:
            env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
        except OSError:
            continue
        if "RANK" in env:
            out[int(env["RANK"])] = pid
    return out


def wait_for(predicate, procs, timeout=240.0, what="the condition"):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        value = predicate()
        if value:
            return value
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"the job ended before {what} (status {p.returncode}):\n{p.stdout.read()}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def finish(proc, timeout=300):
    try:
        text = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"the job did not finish in {timeout} s:\n{proc.communicate()[0]}") from None
    return text


def restart_cost(run_dir, killed_at):
    """Seconds from the kill to the first step finished after it (the log keeps each step's time)."""
    return min(r["time"] for r in step_records(run_dir) if r["time"] > killed_at) - killed_at


def standalone(root, out, *extra):
    return ["--standalone", "--nproc_per_node", "2", "--max-restarts", "2", "-m", "c2f_fast.cli", "train",
            *overrides(root, out, **dict(e.split("=", 1) for e in extra))]


# ----------------------------------------------------------------------------- kill tests
@pytest.mark.slow
@pytest.mark.parametrize("loader, victim", [("torch", 1), ("dali", 0)], ids=["torch-rank1", "dali-rank0"])
def test_killed_worker_restarts_and_ends_bit_identical(synth_root, tmp_path, loader, victim):
    """SIGKILL one worker mid-epoch after a checkpoint: torchrun restarts the group, it continues from
    the checkpoint on its own (run.resume=auto), ends with the configured steps and the weights of an
    uninterrupted run."""
    if loader == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    extra = [f"data.loader={loader}"] + (["data.workers=1"] if loader == "dali" else [])
    reference = torchrun(*standalone(synth_root, tmp_path / "reference", *extra))
    killed = torchrun(*standalone(synth_root, tmp_path / "killed", *extra))
    try:
        # a mid-epoch checkpoint of epoch 1 (steps 3, 6, 9 of 12)
        wait_for(lambda: (s := checkpoint_state(tmp_path / "killed" / ckpt.CHECKPOINT)) and s["tag"] == "step",
                 [killed], what="the first checkpoint")
        pid = workers(killed.pid)[victim]
        os.kill(pid, signal.SIGKILL)
        killed_at = time.time()
        text = finish(killed)
        ref_text = finish(reference)
    finally:
        for p in (reference, killed):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert reference.returncode == 0, ref_text
    assert killed.returncode == 0, text
    assert "resuming" in text, text
    assert "resuming" not in ref_text, ref_text
    resumed_at = int(text.split("resuming", 1)[1].split("step ", 1)[1].split(" ")[0])
    assert 0 < resumed_at < EPOCHS * STEPS_PER_EPOCH
    summary = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert summary["steps"] == EPOCHS * STEPS_PER_EPOCH
    assert [r["step"] for r in step_records(tmp_path / "killed")] == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    assert_same_weights(tmp_path / "killed", tmp_path / "reference")
    print(f"\n{loader}: rank {victim} killed, resumed at step {resumed_at}; restart cost "
          f"{restart_cost(tmp_path / 'killed', killed_at):.1f} s (kill -> next finished step)")


RELAUNCH_AFTER = 2.0  # seconds between the loss and the relaunch (a scheduler noticing it)


@pytest.mark.slow
def test_two_launchers_one_killed_and_relaunched(synth_root, tmp_path):
    """Two torchrun launchers (two "nodes", --nnodes 2, c10d rendezvous on localhost), one worker
    each. All of one launcher's processes are killed: the other's worker fails, its agent restarts
    and waits in the rendezvous for a second node; the killed launcher is started again, as a
    cluster scheduler would (torchrun cannot bring back a node it no longer runs on; with
    --nnodes 1:2 the group would re-form with one process, which a run of two refuses: its global
    batch and sample order depend on the process count). The job then completes."""
    out, port = tmp_path / "nodes", free_port()
    args = ["--nnodes", "2", "--nproc_per_node", "1", "--max-restarts", "2", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "c2f-test", "-m", "c2f_fast.cli", "train",
            *overrides(synth_root, out, **{"optim.epochs": 4, "run.eval_every": 4})]
    logs = [open(tmp_path / f"launcher{i}.log", "w+") for i in range(3)]
    # torchrun (2.14) shares the rendezvous store with the workers and caches its address in the
    # agents after the first round: a node that joins a later round (the relaunched one) then
    # waits for an address the surviving rank-0 agent never publishes again, and both time out.
    # Without the sharing every round publishes it (see docs/distributed.md).
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    first = torchrun(*args, log=logs[0], **env)
    # The first launcher hosts the rendezvous store (the c10d backend keeps it in the agent that
    # binds --rdzv-endpoint): it is the node that must survive; the second one is lost below.
    wait_for(lambda: listening(port), [first], what="the rendezvous store")
    second = torchrun(*args, log=logs[1], **env)
    relaunched = None
    try:
        wait_for(lambda: (s := checkpoint_state(out / ckpt.CHECKPOINT)) and s["tag"] == "step",
                 [first, second], what="the first checkpoint")
        lost = [second.pid, *workers(second.pid).values()]  # the launcher and its worker: a lost node
        for pid in lost:  # (torchrun starts its workers in sessions of their own: no killpg)
            os.kill(pid, signal.SIGKILL)
        killed_at = time.time()
        second.wait(30)
        time.sleep(RELAUNCH_AFTER)
        relaunched = torchrun(*args, log=logs[2], **env)
        first.wait(400)
        relaunched.wait(60)
    finally:
        for p in (first, second, relaunched):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    text = "".join((f.seek(0), f.read())[1] for f in logs)
    assert first.returncode == 0 and relaunched.returncode == 0, text[-20000:]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["steps"] == 4 * STEPS_PER_EPOCH
    assert "resuming" in text
    print(f"\ntwo nodes: restart cost {restart_cost(out, killed_at):.1f} s (kill -> next finished step, "
          f"{RELAUNCH_AFTER} s before the relaunch included)")


HUNG_PEER = """
import os, sys, time
from c2f_fast.distributed import any_rank, init_distributed
info = init_distributed("cpu", timeout=float(sys.argv[1]))
if info.rank == 1:
    time.sleep(120)  # hangs: never joins the collective
try:
    any_rank(info, False)
except Exception as exc:
    print("FAILED:", type(exc).__name__, str(exc).splitlines()[0][-120:], flush=True)
    os._exit(1)
print("no timeout", flush=True)
"""


def test_a_hung_peer_fails_the_collective_after_dist_timeout(tmp_path):
    """run.dist_timeout reaches the process group: the rank waiting for a hung peer fails (and
    torchrun would restart the group) instead of waiting torch's default 10-30 minutes. Measured
    under torchrun (SIGSTOP of one worker, dist_timeout=10): the job restarted and completed."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [subprocess.Popen([sys.executable, "-c", HUNG_PEER, "3"], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        text = procs[0].communicate(timeout=100)[0]
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode == 1 and "FAILED:" in text and "Timed out" in text, text


# ----------------------------------------------------------------------------- run.resume=auto
#: One process, 48 images at batch 8: 6 steps per epoch, a checkpoint every 2.
IN_PROCESS = {"data.batch_size": 8, "data.limit_train": 48, "run.checkpoint_every": 2}

class Crash(RuntimeError):
    pass


def train_until_crash(monkeypatch, cfg_args, step):
    """Train ``cfg_args`` until the run dies (an exception, like a killed process but in this
    one) before training ``step``; the training step is the real one again afterwards."""
    real, count = TrainStep.__call__, {"n": 0}

    def call(self, images, targets):
        count["n"] += 1
        if count["n"] == step:
            raise Crash(f"crash at step {step}")
        return real(self, images, targets)

    with monkeypatch.context() as patched:
        patched.setattr(TrainStep, "__call__", call)
        with pytest.raises(Crash):
            train(load_config(None, cfg_args))


def damage(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(b"not a checkpoint" * 64)
    else:  # "bad_hash": a tensor altered, the file otherwise well-formed
        state = torch.load(path, weights_only=True)
        state["model"][next(iter(state["model"]))].add_(1e-3)
        torch.save(state, path)


@pytest.mark.parametrize("how, reason", [("truncated", "not a readable checkpoint"),
                                         ("garbage", "not a readable checkpoint"),
                                         ("bad_hash", "bad content hash")])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(synth_root, tmp_path, monkeypatch, how, reason):
    cfg_args = overrides(synth_root, tmp_path / "run", **IN_PROCESS)
    train_until_crash(monkeypatch, cfg_args, 5)  # checkpoints at steps 2 and 4, then the crash
    run = tmp_path / "run"
    assert ckpt.load_checkpoint(run / ckpt.PREVIOUS)["run_state"]["step"] == 2
    damage(run / ckpt.CHECKPOINT, how)
    with pytest.warns(RuntimeWarning) as caught:
        summary = train(load_config(None, cfg_args))
    text = " ".join(str(w.message) for w in caught)
    assert str(run / ckpt.CHECKPOINT) in text and reason in text and "checkpoint.prev.pt" in text
    assert summary["steps"] == EPOCHS * 48 // 8
    assert [r["step"] for r in step_records(run)] == list(range(1, summary["steps"] + 1))
    assert (run / "checkpoint.pt.damaged").is_file()  # kept aside, not deleted
    if how == "bad_hash":  # the rest of the run is exact: the weights of an uninterrupted run
        train(load_config(None, overrides(synth_root, tmp_path / "ref", **IN_PROCESS)))
        assert_same_weights(run, tmp_path / "ref")


def test_changed_config_is_refused_naming_the_keys(synth_root, tmp_path, monkeypatch):
    cfg_args = overrides(synth_root, tmp_path / "run", **IN_PROCESS)
    train_until_crash(monkeypatch, cfg_args, 3)
    before = (tmp_path / "run" / ckpt.CHECKPOINT).read_bytes()
    changed = load_config(None, [*cfg_args, "optim.lr=1e-2", "model.hidden=24", "run.log_every=5"])
    with pytest.raises(ConfigError, match=r"model\.hidden \(16 there, 24 now\), optim\.lr") as info:
        train(changed)
    assert "log_every" not in str(info.value)  # how a run reports may change; what it computes may not
    assert (tmp_path / "run" / ckpt.CHECKPOINT).read_bytes() == before
    with pytest.raises(FileExistsError, match="run.resume=never"):
        train(load_config(None, [*cfg_args, "run.resume=never"]))
    summary = train(load_config(None, [*cfg_args, "run.log_every=5"]))  # auto: continues it
    assert summary["steps"] == EPOCHS * 48 // 8
    with pytest.raises(FileNotFoundError, match="no checkpoint.pt"):
        train(load_config(None, [*cfg_args, "run.resume=must", f"run.out={tmp_path / 'empty'}"]))


def test_auto_with_every_checkpoint_damaged_refuses_and_renames_nothing(synth_root, tmp_path, monkeypatch):
    cfg_args = overrides(synth_root, tmp_path / "run", **IN_PROCESS)
    train_until_crash(monkeypatch, cfg_args, 5)
    for name in (ckpt.CHECKPOINT, ckpt.PREVIOUS):
        damage(tmp_path / "run" / name, "truncated")
    with pytest.raises(ckpt.CheckpointError, match=r"no readable checkpoint.*checkpoint\.pt.*checkpoint\.prev\.pt"):
        train(load_config(None, cfg_args))
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint*")) == sorted([ckpt.CHECKPOINT, ckpt.PREVIOUS])


def test_content_hash_catches_an_altered_value(tmp_path):
    ckpt.save_checkpoint(tmp_path, {"run_state": {"step": 7}, "w": torch.arange(6.0), "b": torch.tensor(1.5)})
    assert ckpt.load_checkpoint(tmp_path)["run_state"]["step"] == 7
    state = torch.load(tmp_path / ckpt.CHECKPOINT, weights_only=True)
    state["run_state"]["step"] = 8  # a plain value, not a tensor
    torch.save(state, tmp_path / ckpt.CHECKPOINT)
    with pytest.raises(ckpt.CheckpointError, match="checkpoint.pt: bad content hash"):
        ckpt.load_checkpoint(tmp_path)


# ----------------------------------------------------------------------------- loaders
def take(batches, n=None):
    """``n`` (or all remaining) batches of an epoch's iterator, as (images, indices) copies."""
    out = []
    for images, _, indices in batches:
        out.append((images.clone(), indices.clone()))
        if n is not None and len(out) == n:
            break
    return out


@pytest.mark.parametrize("backend", ["torch", "dali"])
@pytest.mark.parametrize("shard", [0, 1])
def test_loader_resumes_mid_epoch_exactly(synth_root, backend, shard):
    """A loader rebuilt from a mid-epoch position yields the rest of that epoch and the next one
    exactly as the uninterrupted loader does: same images (same crops and flips), same order."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    ds = load_voc(synth_root, split="train")
    make = lambda: build_loader(ds, 5, train=True, image_size=24, backend=backend, num_workers=1,  # noqa: E731
                                shard_id=shard, num_shards=2, seed=3, crop_scale=(0.3, 1.0))
    steps = len(make())  # 48 images per shard, batch 5: 9 batches, 3 images left over
    a = make()
    take(iter(a))  # epoch 0
    epoch1 = iter(a)
    head = take(epoch1, 4)  # epoch 1, 4 of 9 batches
    state, position = a.resume_state(), 4
    rest = take(epoch1)
    after = take(iter(a))  # epoch 2

    b = make()
    b.resume(state)
    if backend == "torch":  # its order is a function of (seed, epoch, batch)
        b.set_epoch(1, start_batch=position)
    rest_b = take(iter(b))
    after_b = take(iter(b))
    assert len(head) + len(rest) == steps and len(rest_b) == len(rest) and len(after_b) == steps
    for (xa, ia), (xb, ib) in zip(rest + after, rest_b + after_b):
        assert torch.equal(ia, ib) and torch.equal(xa, xb)


def test_dali_resume_refuses_another_loaders_state(synth_root):
    pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    ds = load_voc(synth_root, split="train")
    loader = build_loader(ds, 8, train=True, image_size=24, backend="dali", num_workers=1)
    with pytest.raises(ValueError, match="DALI reader state"):
        loader.resume({})


# ----------------------------------------------------------------------------- progress
def test_plain_progress_prints_timed_lines(capsys):
    bar = _PlainProgress("epoch 1/2", total=10, done=2, every=0.0, stream=sys.stdout)
    bar.set_postfix(loss="1.234")
    bar.update(1)
    bar.update(1)
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("epoch 1/2: step 3/10 (30%)") and lines[0].endswith("loss=1.234")
    assert lines[1].startswith("epoch 1/2: step 4/10") and len(lines) == 3 and "\r" not in "".join(lines)
    quiet = _PlainProgress("e", total=100, done=0, every=3600.0, stream=sys.stdout)
    for _ in range(50):
        quiet.update(1)
    assert capsys.readouterr().out == ""  # nothing before `every` seconds


def test_progress_on_a_non_terminal_is_plain(monkeypatch):
    import io

    from c2f_fast.distributed import DistInfo

    cfg = load_config(None, ["run.progress_every=5"])
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    bar = _progress(cfg, info, 10, 0, 0)
    assert isinstance(bar, _PlainProgress) and bar.every == 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bar.close()
