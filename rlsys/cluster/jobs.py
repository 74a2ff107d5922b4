"""Submitting and following training runs as Ray jobs (`rlsys submit`, `rlsys jobs ...`).

    rlsys submit CONFIG.yaml [key=value ...] --address http://HEAD:8265 [--follow] [--job-id ID]
    rlsys jobs list|status ID|logs ID [--follow]|stop ID   [--address http://HEAD:8265]

The address is the Ray dashboard's (the job API): --address, else $RAY_API_SERVER_ADDRESS, else
$RAY_ADDRESS, as Ray's own `ray job` commands take it.

What `rlsys submit` does, in order:
1. Loads and validates the config here (defaults <- CONFIG <- overrides, rlsys.config.load_config):
   a bad key stops before anything reaches the cluster. It also refuses what would only fail (or
   be lost) on the cluster: a relative trainer.output_dir (relative to what? the job runs in
   Ray's temporary copy of the project on the head node; give an absolute path on storage that
   every node and you can reach, or a storage URI, s3://... gs://... file:///...), a relative
   data.path or model.path that is not inside the shipped project folder, and RAY_AUTH_* in
   submit.env_vars (a token there would be stored in the job's runtime environment).
   `--base-dir DIR` (what cluster/submit.sh passes: the folder it runs in) takes a relative
   trainer.output_dir relative to DIR instead; the job gets the absolute path.
2. Ships the project folder as the job's working dir: the folder holding the imported rlsys
   package, which must be a project checkout (a pyproject.toml naming rlsys beside rlsys/; an
   editable install, as ./dev.sh setup makes). Not the current directory: the shipped code is
   then always the code that validated the config, wherever you submit from. Left out: .git,
   .venv, runs/, .cache/, benchmarks/results/, __pycache__, *.egg-info, and submit.excludes (Ray
   also honours the project's .gitignore). In the job, relative data paths resolve against this
   copy, as they do in the project folder here.
3. Ships the merged, validated config itself, not the file and overrides: its YAML
   (rlsys.config.to_yaml: secrets redacted, the values of submit.env_vars among them) travels in
   the environment variable RLSYS_SUBMITTED_CONFIG of the job's runtime environment, and the
   entrypoint runs `-m rlsys.cli train --config-env RLSYS_SUBMITTED_CONFIG` (the shipped rlsys),
   which loads and validates exactly that YAML, with the Python the cluster's Ray runs on, found
   on the node whatever its PATH (RAY_PYTHON; with submit.pip, uv or image_uri: `python`, the
   environment Ray builds for the job). The job's runtime environment also carries the engines' variables
   (rlsys.actors.generator.engine_env), PYTHONUNBUFFERED=1 (the driver's output reaches
   `rlsys jobs logs` as it is printed), submit.env_vars (their real values: the job's own
   environment; Ray keeps them in the job's record on the cluster), and submit.pip / submit.uv /
   submit.image_uri when set (Ray's runtime_env keys of the same names).
4. Prints the job id, its page on the dashboard and how to follow it; --follow streams the
   driver's output until the job ends and exits 1 unless it SUCCEEDED. A job that FAILED is
   reported with why (why_failed: Ray's message and the log's last lines), here, by `rlsys jobs
   status` and by `rlsys jobs logs --follow`: a job that fails before its driver starts (a
   runtime environment that cannot be built) leaves no log to stream.

Authentication: Ray's token authentication stays on; rlsys neither reads nor ships a token. Ray's
JobSubmissionClient sends one when RAY_AUTH_MODE=token is set where rlsys runs, taking it from
RAY_AUTH_TOKEN, or the file RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token. A request the
cluster refuses for its token stops with that explanation (JobError).
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

from rlsys.config import Config, ConfigError, load_config, split_config_args, to_yaml

CONFIG_ENV = "RLSYS_SUBMITTED_CONFIG"
TRAIN = f"-m rlsys.cli train --config-env {CONFIG_ENV}"
# Ray runs a job's entrypoint with /bin/sh from its JobSupervisor, a worker the node's raylet
# started, and `python` there is whatever comes first on the node's PATH: on nodes started as
# `.venv/bin/ray start ...` without the environment activated, another Python (no omegaconf, no
# rlsys), or none. The Python the cluster's Ray runs on is the first word of the raylet's
# --python_worker_command (the interpreter it starts every worker with, the supervisor included):
# the supervisor is this shell's parent ($PPID), the raylet the supervisor's. Where it cannot be
# read (not Linux, a path with spaces), the job stops saying so rather than run another Python.
RAY_PYTHON = (
    r"""raylet=$(sed -n 's/^PPid:[[:space:]]*//p' /proc/$PPID/status); """
    r"""RAY_PYTHON=$(tr '\0' '\n' < /proc/$raylet/cmdline """
    r"""| sed -n 's/^--python_worker_command="\{0,1\}\([^" ]*\).*/\1/p'); """
    r"""[ -x "$RAY_PYTHON" ] || { echo "rlsys: cannot tell which Python this node's Ray runs on (no executable """
    r"""path after --python_worker_command= in /proc/$raylet/cmdline, the raylet that started the job supervisor """
    r"""$PPID; got '$RAY_PYTHON'), so the job does not run whatever python is first on the node's PATH. With """
    r"""submit.pip, submit.uv or submit.image_uri the job runs the python of the environment Ray builds" >&2; """
    r"""exit 127; }; exec "$RAY_PYTHON" """)
ENTRYPOINT = RAY_PYTHON + TRAIN
ENTRYPOINT_IN_ENV = "python " + TRAIN
"""With submit.pip / submit.uv (Ray activates the virtualenv it builds on the node's Ray Python:
its bin first on PATH) or submit.image_uri (the image's own Python, as Ray requires), `python`."""
# Never uploaded: version control, the environment, run outputs, caches, benchmark results.
EXCLUDES = [".git", ".venv", "runs/", ".cache/", "benchmarks/results/", "__pycache__", "*.egg-info"]
EXCLUDED_DIRS = (".git", ".venv", "runs", ".cache", "benchmarks/results")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AUTH_HELP = ("Ray's token authentication: set RAY_AUTH_MODE=token where you run rlsys and give the cluster's "
             "token as the RAY_AUTH_TOKEN environment variable, or in a file named by RAY_AUTH_TOKEN_PATH, or in "
             "~/.ray/auth_token (where Ray's JobSubmissionClient looks for it)")


class JobError(RuntimeError):
    pass


def project_dir() -> Path:
    """The project checkout the running rlsys package lives in (the folder shipped as working dir)."""
    import rlsys

    root = Path(rlsys.__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if not (pyproject.is_file() and 'name = "rlsys"' in pyproject.read_text()):
        raise JobError(f"rlsys is imported from {root / 'rlsys'}, which is not inside a project checkout (no "
                       f"pyproject.toml naming rlsys in {root}): rlsys submit ships the project folder as the "
                       f"job's working dir, so run it from an editable install (./dev.sh setup, pip install -e .)")
    return root


def resolve_address(given: str | None) -> str:
    """--address, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS (the order of Ray's `ray job` commands)."""
    address = given or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise JobError("no cluster address: pass --address http://HEAD:8265 (the Ray dashboard's address), or set "
                       "RAY_API_SERVER_ADDRESS (or RAY_ADDRESS)")
    return address


def dashboard_url(address: str, job_id: str) -> str:
    base = address.rstrip("/")
    if "://" not in base:
        base = f"http://{base}"
    return f"{base}/#/jobs/{job_id}"


def _shipped(project: Path, rel: Path) -> bool:
    """A relative path exists in the project folder and is not left out of the upload."""
    return (project / rel).exists() and not any(rel.as_posix() == d or rel.as_posix().startswith(d + "/")
                                                for d in EXCLUDED_DIRS)


def check_submittable(cfg: Config, project: Path) -> None:
    """What a validated config can still get wrong only on the cluster; each message names the key."""
    from rlsys.cluster.storage import is_uri

    out = cfg.trainer.output_dir
    if not is_uri(out) and not Path(out).is_absolute():
        raise ConfigError(
            f"trainer.output_dir={out} is relative: a path on this machine means nothing on the cluster, where the "
            f"job runs in Ray's temporary copy of the project on the head node. Give an absolute path on storage "
            f"every node and you can reach (NFS, a mounted bucket), or a storage URI such as s3://bucket/runs/x, "
            f"gs://bucket/runs/x or file:///shared/runs/x")
    if not cfg.data.name:
        data = Path(cfg.data.path)
        if not data.is_absolute() and not _shipped(project, data):
            raise ConfigError(
                f"data.path={cfg.data.path} is relative and not a file in the shipped project folder {project} "
                f"(runs/, .cache/ and the like are not shipped): in the job it resolves against that folder's copy. "
                f"Put the file inside the project folder or give an absolute path the head node can read")
    model = Path(cfg.model.path).expanduser()
    if not model.is_absolute() and model.exists() and not _shipped(project, model):
        raise ConfigError(
            f"model.path={cfg.model.path} is a local folder here, but not one shipped with the project folder "
            f"{project}: give an absolute path every node can read, or a hub id")
    secrets = sorted(k for k in cfg.submit.env_vars if k.startswith("RAY_AUTH"))
    if secrets:
        raise ConfigError(f"submit.env_vars: {secrets} are not shipped: the cluster's nodes hold their own auth "
                          f"settings, and a token there would be stored in the job's runtime environment")


def runtime_env(cfg: Config, project: Path) -> dict:
    """Ray's runtime_env for the job: the project folder, the merged config (secrets redacted), the
    engines' variables, submit.env_vars with their real values."""
    from rlsys.actors.generator import engine_env

    env = {**engine_env(cfg.generator), "PYTHONUNBUFFERED": "1", **cfg.submit.env_vars, CONFIG_ENV: to_yaml(cfg)}
    out = {"working_dir": str(project), "excludes": [*EXCLUDES, *cfg.submit.excludes], "env_vars": env}
    if cfg.submit.pip:
        out["pip"] = list(cfg.submit.pip)
    if cfg.submit.uv:
        out["uv"] = list(cfg.submit.uv)
    if cfg.submit.image_uri:
        out["image_uri"] = cfg.submit.image_uri
    return out


def entrypoint(cfg: Config) -> str:
    """The job's command: the shipped rlsys with the Python the cluster's Ray runs on (RAY_PYTHON),
    or `python` where Ray builds the job an environment of its own (ENTRYPOINT_IN_ENV)."""
    if cfg.submit.pip or cfg.submit.uv or cfg.submit.image_uri:
        return ENTRYPOINT_IN_ENV
    return ENTRYPOINT


def load_shipped_config(var: str) -> Config:
    """The config `rlsys submit` validated, from the job's environment (the entrypoint's --config-env)."""
    text = os.environ.get(var)
    if not text:
        raise ConfigError(f"--config-env {var}: no such environment variable (rlsys submit sets {CONFIG_ENV} in "
                          f"the job it submits)")
    with tempfile.TemporaryDirectory() as tmp:  # load_config reads a file: the same checks as any config
        path = Path(tmp) / "submitted.yaml"
        path.write_text(text)
        return load_config(path)


class _RayErrors:
    """Ray's client errors as JobError naming the address (and, for a refused token, where Ray looks)."""

    def __init__(self, address: str):
        self.address = address

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        from ray.exceptions import AuthenticationError

        if error is None or isinstance(error, JobError):
            return False
        if isinstance(error, AuthenticationError):
            raise JobError(f"the cluster at {self.address} refused the request: {error.message}. {AUTH_HELP}") from None
        if isinstance(error, ConnectionError):
            raise JobError(f"cannot reach the Ray job API at {self.address} ({error}); the address is the Ray "
                           f"dashboard's, e.g. http://HEAD:8265") from None
        if isinstance(error, RuntimeError):  # Ray's "Request failed with status code ...": an unknown job id
            raise JobError(f"{self.address}: {error}") from None
        return False


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    with _RayErrors(address):
        return JobSubmissionClient(address)


def submit(config: str | Path | None, overrides: list[str], address: str, submission_id: str | None = None,
           out: TextIO | None = None, base_dir: Path | None = None) -> str:
    """Validate here, then submit; returns the job's submission id. base_dir: a relative
    trainer.output_dir is taken relative to it (cluster/submit.sh passes the folder it runs in),
    and the absolute path is what the job gets."""
    from rlsys.cluster.storage import is_uri
    from rlsys.config import DEFAULT_CONFIG

    cfg = load_config(config or DEFAULT_CONFIG, overrides)
    if base_dir is not None and not is_uri(cfg.trainer.output_dir) and not Path(cfg.trainer.output_dir).is_absolute():
        cfg.trainer.output_dir = str(Path(base_dir).resolve() / cfg.trainer.output_dir)
    project = project_dir()
    check_submittable(cfg, project)
    env = runtime_env(cfg, project)
    jobs = client(address)
    with _RayErrors(address):
        job_id = jobs.submit_job(entrypoint=entrypoint(cfg), runtime_env=env, submission_id=submission_id)
    print(f"submitted job {job_id}\n"
          f"  run folder: {cfg.trainer.output_dir}\n"
          f"  dashboard:  {dashboard_url(address, job_id)}\n"
          f"  follow:     rlsys jobs logs {job_id} --follow --address {address}\n"
          f"  stop:       rlsys jobs stop {job_id} --address {address}", file=out or sys.stdout, flush=True)
    return job_id


def status(jobs, job_id: str) -> tuple[str, str | None]:
    info = jobs.get_job_info(job_id)
    return str(info.status), info.message


def why_failed(jobs, job_id: str, message: str | None, lines: int = 20) -> list[str]:
    """Why a job failed, in at most about 2 * lines lines: Ray's message (for a driver that exited
    non-zero it ends with the driver's last log lines; for a runtime environment that could not be
    set up, or a supervisor that died, it is the reason itself) as its first line and its last
    `lines`; then the last `lines` of the job's log when the message does not already end with them."""
    text = (message or "").rstrip("\n").splitlines()
    out = text[:1] + (["..."] if len(text) > lines + 1 else []) + text[1:][-lines:]
    log = [ln for ln in jobs.get_job_logs(job_id).rstrip("\n").splitlines() if ln.strip()][-lines:]
    if log and log[-1] not in out:
        out += ["last lines of the job's log:", *log]
    return out or ["(Ray gave no message and the job's log is empty)"]


def wait_terminal(jobs, job_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        state, _ = status(jobs, job_id)
        if state in TERMINAL:
            return state
        if time.monotonic() > deadline:
            raise JobError(f"job {job_id} is still {state} after {timeout_s:.0f}s")
        time.sleep(1.0)


def follow(jobs, job_id: str, out: TextIO | None = None, settle_s: float = 60.0) -> str:
    """Stream the job's output until it ends; returns its final status."""
    out = out or sys.stdout
    async def tail():
        async for lines in jobs.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    asyncio.run(tail())
    # The stream closes when the driver exits; the job's final status is recorded just after.
    return wait_terminal(jobs, job_id, settle_s)


def list_lines(jobs) -> list[str]:
    """One line per job: id, status, start time, entrypoint (shortened); oldest first."""
    lines = []
    for job in sorted(jobs.list_jobs(), key=lambda j: j.start_time or 0):
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000)) if job.start_time else "-"
        entry = job.entrypoint or "-"
        if entry.startswith(RAY_PYTHON):  # the command, not the shell line that finds its Python
            entry = "$RAY_PYTHON " + entry.removeprefix(RAY_PYTHON)
        entry = entry if len(entry) <= 60 else entry[:57] + "..."
        lines.append(f"{job.submission_id or job.job_id}  {job.status}  {started}  {entry}")
    return lines


def follow_to_end(jobs, job_id: str) -> int:
    """Stream the job's output until it ends, then how it ended (with why, when it FAILED: a job
    that failed before its driver printed anything streams nothing); exit 0 only if it SUCCEEDED."""
    final = follow(jobs, job_id)
    print(f"job {job_id}: {final}")
    if final == "FAILED":
        print("\n".join(why_failed(jobs, job_id, status(jobs, job_id)[1])))
    return 0 if final == "SUCCEEDED" else 1


def submit_main(args) -> int:
    address = resolve_address(args.address)
    given, overrides = split_config_args(args.args)
    job_id = submit(given, overrides, address, args.submission_id, base_dir=args.base_dir)
    if not args.follow:
        return 0
    jobs = client(address)
    with _RayErrors(address):
        return follow_to_end(jobs, job_id)


def jobs_main(args) -> int:
    address = resolve_address(args.address)
    jobs = client(address)
    with _RayErrors(address):
        if args.action == "list":
            for line in list_lines(jobs):
                print(line)
            return 0
        if args.action == "status":
            state, message = status(jobs, args.job_id)
            print(state)
            if state == "FAILED":
                print("\n".join(why_failed(jobs, args.job_id, message)))
            elif message:
                print(message)
            return 0
        if args.action == "logs":
            if not args.follow:
                sys.stdout.write(jobs.get_job_logs(args.job_id))
                return 0
            return follow_to_end(jobs, args.job_id)
        if args.action == "stop":
            jobs.stop_job(args.job_id)
            final = wait_terminal(jobs, args.job_id, args.timeout)
            print(final)  # STOPPED, or how it ended before the stop reached it
            return 0
    raise JobError(f"unknown jobs action {args.action!r}")
