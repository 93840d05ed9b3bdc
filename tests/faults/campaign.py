"""The fault campaign of issue 13, replayed through the command line: each case's exit code and its one line.

    python tests/faults/campaign.py --code /path/to/a/checkout --work /tmp/campaign [--only c01,c08]

Runs `python -m grpo_kd.cli.app` with PYTHONPATH=CODE, so the same cases can be replayed against any checkout
(the version before the fixes and after). Each case gets its own directory under WORK/CODE-NAME with
`runs/tiny-models` (built once per WORK) and a copy of configs/tiny.yaml as `tiny.yaml`, as the issue describes.
Prints one markdown table row per case: the case, the exit code, the line that matters (the last line on stderr,
or what a check found) and, where the issue's harm is a file, what the check of that file says. Slow (tens of
minutes: many cases run the tiny loop); it is a record for the report, not a test (tests/faults/test_*.py are).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


class Case:
    def __init__(self, code: Path, work: Path, name: str):
        self.code, self.dir = code, work / code.name / name
        shutil.rmtree(self.dir, ignore_errors=True)
        (self.dir / "runs").mkdir(parents=True)
        (self.dir / "runs" / "tiny-models").symlink_to(work / "tiny-models")
        shutil.copy(ROOT / "configs" / "tiny.yaml", self.dir / "tiny.yaml")
        self.env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                    "TRITON_INTERPRET": "1"}

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([PY, "-m", "grpo_kd.cli.app", *args], cwd=self.dir, env=self.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def run(self, *args: str, timeout: int = 900, stdout: bool = False) -> tuple[int, str]:
        done = subprocess.run([PY, "-m", "grpo_kd.cli.app", *args], cwd=self.dir, env=self.env, text=True,
                              capture_output=True, timeout=timeout)
        if stdout:
            return done.returncode, last_line(done.stdout) or last_line(done.stderr)
        return done.returncode, last_line(done.stderr) or last_line(done.stdout)

    def copy_run(self, source: Path, name: str) -> Path:
        target = self.dir / "runs" / name
        shutil.copytree(source, target, symlinks=True)
        return target

    def py(self, code: str) -> str:
        done = subprocess.run([PY, "-c", code], cwd=self.dir, env=self.env, text=True, capture_output=True)
        return (done.stdout.strip() or last_line(done.stderr))


def last_line(text: str) -> str:
    """The line that matters: an `error:` line, else a damaged shard being done again, else the last line."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    for marker in ("error:", "doing it again"):
        found = [line for line in lines if marker in line]
        if found:
            return found[-1][:400]
    return lines[-1][:400] if lines else ""


def flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


SET_TEACHER_VALUE = """
import json, sys, hashlib, numpy as np, pyarrow as pa
from pathlib import Path
path, value = Path(sys.argv[1]), float(sys.argv[2])
table = pa.ipc.open_file(pa.BufferReader(path.read_bytes())).read_all()  # in memory: the file is rewritten
column = table.column("target_logprobs").combine_chunks()
values = column.values.to_numpy().copy(); values[0] = value
index = table.schema.get_field_index("target_logprobs")  # the field kept as it was (type, nullability)
table = table.set_column(index, table.schema.field(index),
                         pa.ListArray.from_arrays(column.offsets, pa.array(values, pa.float32())))
with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
    writer.write_table(table)
manifest = path.with_name(path.name.replace(".arrow", ".manifest.json"))
data = json.loads(manifest.read_text()); data["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
data["bytes"] = path.stat().st_size
manifest.write_text(json.dumps(data))
if path.parent.name == "rollouts":  # the teacher shard records the checksum of the rollouts it scored
    teacher = path.parent.parent / "teacher" / manifest.name
    scored = json.loads(teacher.read_text()); scored["rollouts"]["sha256"] = data["sha256"]
    teacher.write_text(json.dumps(scored))
"""

WEIGHTS = """
import sys, math
from safetensors.torch import load_file
t = load_file(sys.argv[1])
bad = sum(int((~v.isfinite()).sum()) for v in t.values()); total = sum(v.numel() for v in t.values())
print(f"{bad} of {total} weights non-finite")
"""


def weights_of(case: Case, run: Path, iteration: int) -> str:
    path = run / "checkpoints" / f"iter_{iteration:04d}" / "model" / "model.safetensors"
    if not path.is_file():
        return f"no checkpoint iter_{iteration:04d}"
    return case.py(WEIGHTS.replace("sys.argv[1]", repr(str(path))))


def same_weights(a: Path, b: Path) -> str:
    from safetensors.torch import load_file

    pa, pb = (p / "model" / "model.safetensors" for p in (a, b))
    if not pb.is_file():
        return "no checkpoint"
    x, y = load_file(str(pa)), load_file(str(pb))
    return "weights bit-identical to the clean run" if all((x[k] == y[k]).all() for k in x) else "weights differ"


# ---------------------------------------------------------------------------------------------- the cases


def corrupted(case: Case, base: Path, damage) -> tuple[int, str, str]:
    run = case.copy_run(base, "x")
    shutil.rmtree(run / "checkpoints" / "iter_0002")
    damage(run)
    code, line = case.run("run", "--config", "tiny.yaml", "--iterations", "2", "--in-process", "name=x")
    verdict = same_weights(base / "checkpoints" / "iter_0002", run / "checkpoints" / "iter_0002")
    return code, line, f"{weights_of(case, run, 2)}; {verdict}"


def swap(run: Path) -> None:
    a, b = (run / f"iter_000{i}" / "teacher" / "part-00000.arrow" for i in (1, 2))
    tmp = a.with_name("swap")
    a.rename(tmp), b.rename(a), tmp.rename(b)


def loop(case: Case, *overrides: str, iterations: int = 1, config: str = "tiny.yaml") -> tuple[int, str, str]:
    code, line = case.run("run", "--config", config, "--iterations", str(iterations), "--in-process", "name=x",
                          *overrides)
    run = case.dir / "runs" / "x"
    rollout = "rollout ran first" if (run / "iter_0001" / "rollouts" / "manifest.json").exists() else "nothing ran"
    return code, line, f"{rollout}; {weights_of(case, run, iterations)}"


def case_sighup(case: Case) -> tuple[int, str, str]:
    proc, _, phase = _long_update_running(case)
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=600)
    time.sleep(5)
    alive = [pid for pid in phase if _alive(pid)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    return proc.returncode, last_line(err), f"phase process still running 5 s later: {bool(alive)}"


def case_sigkill(case: Case) -> tuple[int, str, str]:
    proc, metrics, phase = _long_update_running(case)
    proc.kill()
    proc.wait()
    second_code, second_line = case.run(*LONG_RUN)
    for _ in range(600):  # the orphan (if any) finishes or stops
        if not any(_alive(pid) for pid in phase):
            break
        time.sleep(1)
    third_code, _ = case.run(*LONG_RUN)
    rows = [(r["iteration"], r["step"]) for r in map(json.loads, metrics.read_text().splitlines())]
    return second_code, second_line, (f"metrics.jsonl: {len(rows)} rows for {len(set(rows))} steps of "
                                      f"{len({i for i, _ in rows})} iterations (each step once: "
                                      f"{len(rows) == len(set(rows))}); a third run exits {third_code}")


LONG_RUN = ("run", "--config", "tiny.yaml", "name=x", "optim.epochs_per_iteration=25")  # an update of minutes


def _long_update_running(case: Case):
    """`grpo-kd run` of LONG_RUN started and left until its update has logged 3 steps (10 min at most): (the
    executor's Popen, the metrics log, the pids of its phase processes)."""
    proc = case.popen(*LONG_RUN)
    metrics = case.dir / "runs" / "x" / "logs" / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3) and time.monotonic() < deadline:
        time.sleep(0.2)
    return proc, metrics, _phase_pids(proc.pid)


def _phase_pids(executor: int) -> list[int]:
    time.sleep(0.5)
    out = subprocess.run(["pgrep", "-P", str(executor)], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat")
    return not (state.is_file() and state.read_text().split(")")[-1].split()[0] == "Z")


def case_full_disk(case: Case, stage: str) -> tuple[int, str, str]:
    disk = case.dir / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], check=True)
    try:
        out = f"output_dir={disk}"
        if stage == "cache-teacher":
            case.run("rollout", "--config", "tiny.yaml", "name=x", out)
        else:
            case.run("rollout", "--config", "tiny.yaml", "name=x", out)
            case.run("cache-teacher", "--config", "tiny.yaml", "name=x", out)
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(b"\0" * max(free - 48 * 1024, 0))
        code, line = case.run("run", "--config", "tiny.yaml", "--iterations", "1", "--in-process", "name=x", out)
        leftovers = sorted(str(p.relative_to(disk)) for p in disk.rglob("*") if ".tmp-" in p.name)
        return code, line, f"temporary leftovers: {leftovers or 'none'}"
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def case_pickle(case: Case) -> tuple[int, str, str]:
    student = case.dir / "pickle-student"
    shutil.copytree(case.dir / "runs" / "tiny-models" / "student", student)
    case.py(f"import torch; from safetensors.torch import load_file; "
            f"torch.save(load_file({str(student / 'model.safetensors')!r}), {str(student / 'pytorch_model.bin')!r})")
    (student / "model.safetensors").unlink()
    return loop(case, f"model.path={student}")


def case_report(case: Case) -> tuple[int, str, str]:
    run = case.dir / "runs" / "x"
    (run / "logs").mkdir(parents=True)
    rows = [{"iteration": 1, "step": 1, "epoch": 0, "loss": 0.02071, "grad_norm": 0.5}]
    rows += [{"iteration": 1, "step": s, "epoch": 0, "loss": "nan", "grad_norm": "nan"} for s in range(2, 33)]
    (run / "logs" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, line = case.run("report", str(run))
    text = (run / "reports" / "report.md").read_text() if (run / "reports" / "report.md").is_file() else ""
    loss = next((x for x in text.splitlines() if x.startswith("| loss |")), "no loss row")
    headline = next((x for x in text.splitlines() if "non-finite" in x), "no count of non-finite steps")
    return code, line, f"{loss}; {headline}"


def nonutf8(case: Case, kind: str) -> tuple[int, str, str]:
    faroese = "Eg eri føddur í Havn og búgvi í Klaksvík.\nTað var ein góður dagur á Sandoy.\n" * 40
    if kind == "binary":
        (case.dir / "p.txt").write_bytes(Path(sys.executable).read_bytes()[:20000])
        args = ["data.prompts=p.txt"]
    elif kind == "latin1":
        (case.dir / "p.txt").write_bytes(faroese.encode("latin-1"))
        args = ["data.prompts=p.txt"]
    elif kind == "one-byte":
        data = bytearray(faroese.encode("utf-8"))
        data[data.index("Klaksvík".encode()) + 6] = 0xFF
        (case.dir / "p.txt").write_bytes(bytes(data))
        args = ["data.prompts=p.txt"]
    elif kind == "jsonl":
        lines = "".join(json.dumps({"prompt": line}, ensure_ascii=False) + "\n" for line in faroese.splitlines())
        (case.dir / "p.jsonl").write_bytes(lines.encode("latin-1"))
        args = ["data.prompts=p.jsonl", "data.format=jsonl"]
    else:  # the config file itself
        text = (case.dir / "tiny.yaml").read_text().replace("name: tiny", "name: tiny  # Tórshavn")
        (case.dir / "tiny.yaml").write_bytes(text.encode("latin-1"))
        code, line = case.run("config", "validate", "tiny.yaml", stdout=True)
        return code, line, "config validate"
    return loop(case, *args)


def build_cases(base_run: Path) -> dict:
    teacher2 = lambda run: run / "iter_0002" / "teacher" / "part-00000.arrow"  # noqa: E731
    set_value = lambda value: lambda run: subprocess.run(  # noqa: E731
        [PY, "-c", SET_TEACHER_VALUE, str(teacher2(run)), value], check=True)
    return {
        "c01 1: one bit flipped in a teacher shard, then `run`": lambda c: corrupted(
            c, base_run, lambda r: flip_bit(teacher2(r))),
        "c02 1: one bit flipped in a rollout shard, then `run`": lambda c: corrupted(
            c, base_run, lambda r: flip_bit(r / "iter_0002" / "rollouts" / "part-00000.arrow")),
        "c03 1: two iterations' teacher files swapped, then `run`": lambda c: corrupted(c, base_run, swap),
        "c04 2: NaN in target_logprobs (manifest checksum updated), then `run`": lambda c: corrupted(
            c, base_run, set_value("nan")),
        "c05 2: 1e30 in target_logprobs (manifest checksum updated), then `run`": lambda c: corrupted(
            c, base_run, set_value("1e30")),
        "c06 2: the student's checkpoint all NaN, then the next rollout": case_nan_student,
        "c07 2: `cache verify` on rollouts holding NaN log-probs": case_nan_rollouts,
        "c08 2: optim.lr=1e6": lambda c: loop(c, "optim.lr=1e6"),
        "c09 2: `report` on a run whose last 31 of 32 steps are NaN": case_report,
        "c10 3: a 700-token teacher (another vocabulary)": case_cross_tokenizer,
        "c11 4: a binary file as data.prompts": lambda c: nonutf8(c, "binary"),
        "c12 4: Latin-1 Faroese text as data.prompts": lambda c: nonutf8(c, "latin1"),
        "c13 4: one bad byte in a UTF-8 text file": lambda c: nonutf8(c, "one-byte"),
        "c14 4: Latin-1 JSONL": lambda c: nonutf8(c, "jsonl"),
        "c15 4: a Latin-1 config file (`config validate`)": lambda c: nonutf8(c, "config"),
        "c16 5: SIGHUP to `grpo-kd run` during the update": case_sighup,
        "c17 5: SIGKILL of `grpo-kd run` during the update, then run again": case_sigkill,
        "c18 6: teacher.num_shards=0": lambda c: loop(c, "teacher.num_shards=0"),
        "c19 6: rollout.num_shards=0": lambda c: loop(c, "rollout.num_shards=0"),
        "c20 7: optim.lr=-1e-3": lambda c: loop(c, "optim.lr=-1e-3"),
        "c21 7: optim.micro_batch_size=0": lambda c: loop(c, "optim.micro_batch_size=0"),
        "c22 7: a truncated checkpoint, then `run` of the next iteration": lambda c: case_truncated(c, base_run, "run"),
        "c23 7: a truncated checkpoint, then `evaluate`": lambda c: case_truncated(c, base_run, "evaluate"),
        "c24 7: `cache stats` on a swapped cache": case_stats_swapped,
        "c25 7: a full disk during cache-teacher with --in-process": lambda c: case_full_disk(c, "cache-teacher"),
        "c26 7: a pickle pytorch_model.bin as the student": case_pickle,
        "c27 8: teacher.top_k=5000": lambda c: loop(c, "teacher.top_k=5000"),
        "c28 8: teacher.top_k=0": lambda c: loop(c, "teacher.top_k=0"),
        "c29 8: teacher.temperature=0": lambda c: loop(c, "teacher.temperature=0"),
        "c30 8: a missing teacher path": lambda c: loop(c, "teacher.path=runs/no-such/teacher"),
        "c31 8: teacher_kl.estimate=sampled with teacher.num_samples=0": lambda c: loop(
            c, "loss.algorithm=minillm", "loss.teacher_kl.estimate=sampled", "loss.teacher_kl.divergence=forward"),
        "c32 8: loss.policy.epsilon_low=-0.5": lambda c: loop(c, "loss.policy.epsilon_low=-0.5"),
        "c33 8: loss.policy.beta=-1": lambda c: loop(c, "loss.policy.beta=-1"),
        "c34 8: optim.epochs_per_iteration=0": lambda c: loop(c, "optim.epochs_per_iteration=0"),
        "c35 8: `iterations: 0` in the YAML": case_zero_iterations,
        "c36 8: GRPO with rollout.group_size=1": lambda c: loop(c, "rollout.group_size=1"),
        "c37 8: a PPO-only key under GRPO": lambda c: loop(c, "loss.ppo.gamma=0.9"),
        "c38 9: `update` alone on a damaged finished teacher shard": case_update_damaged,
        "c39 9: a full disk when the update checkpoints": lambda c: case_full_disk(c, "update"),
        "c40 9: one byte flipped in a checkpoint's model.safetensors, then the next iteration": case_flipped_checkpoint,
        "c41 9: name: ../../escape": lambda c: loop(c, "name=../../escape"),
    }


def case_nan_student(c: Case) -> tuple[int, str, str]:
    run = c.copy_run(BASE_RUN, "x")
    shutil.rmtree(run / "checkpoints" / "iter_0002")
    shutil.rmtree(run / "iter_0002")
    model = run / "checkpoints" / "iter_0001" / "model" / "model.safetensors"
    c.py(f"import torch, json, hashlib; from pathlib import Path; from safetensors.torch import load_file, save_file\n"
         f"p = Path({str(model)!r}); t = load_file(str(p)); save_file({{k: torch.full_like(v, float('nan')) "
         f"for k, v in t.items()}}, str(p), metadata={{'format': 'pt'}})\n"
         f"s = p.parents[1] / 'checksums.json'\n"
         f"if s.is_file():\n d = json.loads(s.read_text()); d['sha256']['model/model.safetensors'] = "
         f"hashlib.sha256(p.read_bytes()).hexdigest(); s.write_text(json.dumps(d))")
    code, line = c.run("run", "--config", "tiny.yaml", "--iterations", "2", "--in-process", "name=x")
    verify = c.run("cache", "verify", str(run), "--iteration", "2")
    return code, line, f"then `cache verify --iteration 2`: exit {verify[0]}, {verify[1]}"


def case_nan_rollouts(c: Case) -> tuple[int, str, str]:
    run = c.copy_run(BASE_RUN, "x")
    part = run / "iter_0002" / "rollouts" / "part-00000.arrow"
    c.py(SET_TEACHER_VALUE.replace('"target_logprobs"', '"old_logprobs"').replace("sys.argv[1]", repr(str(part)))
         .replace("float(sys.argv[2])", "float('nan')"))
    return (*c.run("cache", "verify", str(run), "--iteration", "2"), "")


def case_cross_tokenizer(c: Case) -> tuple[int, str, str]:
    c.run("tiny-models", "runs/tiny700", "--vocab-size", "700")
    return loop(c, "teacher.path=runs/tiny700/teacher")


def case_truncated(c: Case, base: Path, how: str) -> tuple[int, str, str]:
    run = c.copy_run(base, "x")
    model = run / "checkpoints" / "iter_0002" / "model" / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    if how == "run":
        return (*c.run("run", "--config", "tiny.yaml", "--iterations", "3", "--in-process", "name=x"), "")
    return (*c.run("evaluate", "--checkpoint", str(model.parent), "--teacher", "runs/tiny-models/teacher",
                   "--suite", "perplexity", "--text", "runs/tiny-models/heldout.txt"), "")


def case_stats_swapped(c: Case) -> tuple[int, str, str]:
    run = c.copy_run(BASE_RUN, "x")
    swap(run)
    return (*c.run("cache", "stats", str(run)), "")


def case_zero_iterations(c: Case) -> tuple[int, str, str]:
    text = (c.dir / "tiny.yaml").read_text().replace("iterations: 3", "iterations: 0")
    (c.dir / "zero.yaml").write_text(text)
    code, line = c.run("run", "--config", "zero.yaml", "--in-process", "name=x")
    return code, line, ""


def case_update_damaged(c: Case) -> tuple[int, str, str]:
    run = c.copy_run(BASE_RUN, "x")
    shutil.rmtree(run / "checkpoints" / "iter_0002")
    flip_bit(run / "iter_0002" / "teacher" / "part-00000.arrow")
    code, line = c.run("update", "--config", "tiny.yaml", "--iteration", "2", "name=x", "--resume")
    return code, line, weights_of(c, run, 2)


def case_flipped_checkpoint(c: Case) -> tuple[int, str, str]:
    run = c.copy_run(BASE_RUN, "x")
    flip_bit(run / "checkpoints" / "iter_0002" / "model" / "model.safetensors")
    code, line = c.run("run", "--config", "tiny.yaml", "--iterations", "3", "--in-process", "name=x")
    return code, line, ""


BASE_RUN = Path()


def main() -> int:
    global BASE_RUN
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--code", type=Path, default=ROOT)
    p.add_argument("--work", type=Path, default=Path("/tmp/campaign"))
    p.add_argument("--only", default="")
    args = p.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    models = work / "tiny-models"
    if not (models / "build.json").is_file():
        subprocess.run([PY, "-m", "grpo_kd.cli.app", "tiny-models", str(models)], check=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
    setup = Case(args.code.resolve(), work, "_base")
    BASE_RUN = setup.dir / "runs" / "corr"
    code, line = setup.run("run", "--config", "tiny.yaml", "--iterations", "2", "--in-process", "name=corr")
    assert code == 0, line
    cases = build_cases(BASE_RUN)
    only = [x for x in args.only.split(",") if x]
    print("| case | exit | line | check |\n|---|---|---|---|", flush=True)
    for title, run_case in cases.items():
        key = title.split()[0]
        if only and key not in only:
            continue
        started = time.monotonic()
        try:
            code, line, check = run_case(Case(args.code.resolve(), work, key))
        except Exception as exc:  # noqa: BLE001 - a record of what happened, whatever it was
            code, line, check = "-", f"campaign error: {type(exc).__name__}: {exc}", ""
        line = line.replace("|", "\\|")
        print(f"| {title} | {code} | {line} | {check} ({time.monotonic() - started:.0f} s) |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
