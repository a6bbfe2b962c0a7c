"""`starlift serve --ray`: the serve app as a Ray Serve deployment on a real local Ray cluster.

The session starts its own single-node cluster (`ray start --head --block` on 127.0.0.1, free
ports, no dashboard, its own temp dir, a 200 MB object store, 2 CPUs) in a new process group and
ends exactly that group and the processes it spawned, also when a test fails; never `ray stop`
(it would stop other people's clusters on this machine). Replicas take 0.5 CPU so two fit on the
2-core runner. The model is the bundled starcoder2-nano.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="starlift serve --ray needs the ray extra (pip install 'starlift[ray]')")
openai = pytest.importorskip("openai", reason="the official openai client is in the test extra")
httpx = pytest.importorskip("httpx", reason="httpx is in the serve and test extras")
psutil = pytest.importorskip("psutil", reason="psutil (bench extra) finds the cluster's processes")

from tests.test_serve import ServerProcess  # noqa: E402

pytestmark = pytest.mark.slow  # the slow tier: `make test-slow` (CI runs both)

BIN = Path(sys.executable).parent
EXE = BIN / "starlift"
MODEL = "nano"
PROMPTS = ["def fibonacci(n):\n", "import os\n\ndef list_files(path):\n", "class Stack:\n    def push(self, x):\n"]


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class RayCluster:
    """`ray start --head --block` in its own session; ``stop`` ends that process group and every
    process it spawned (workers, replicas), recorded by PID, and nothing else."""

    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="sl-ray-", dir="/tmp")  # short: Ray's socket paths must fit
        gcs, nm, om, client, agent, agent_grpc, metrics, renv, self.http_port = _free_ports(9)
        self.address = f"127.0.0.1:{gcs}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.log = open(os.path.join(self.tmp, "ray-start.log"), "w")
        self.proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
             f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--ray-client-server-port={client}",
             f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={renv}", "--include-dashboard=false",
             "--num-cpus=2", f"--temp-dir={self.tmp}", "--object-store-memory=200000000", "--disable-usage-stats"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"ray start did not come up: {Path(self.log.name).read_text()[-2000:]}")
            if "Ray runtime started" in Path(self.log.name).read_text():
                break
            time.sleep(0.3)

    def processes(self) -> list:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def replica_pids(self) -> set[int]:
        pids = set()
        for p in self.processes():
            try:
                if "ServeReplica" in " ".join(p.cmdline()):
                    pids.add(p.pid)
            except psutil.Error:
                pass
        return pids

    def stop(self) -> None:
        ours = self.processes()
        try:
            # a throwaway test cluster: SIGTERM its process group and every process it spawned
            # (recorded by PID), SIGKILL what is left after 5 s; `ray stop` would hit other clusters
            for p in ours:
                try:
                    p.terminate()
                except psutil.NoSuchProcess:
                    pass
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
            _, alive = psutil.wait_procs(ours, timeout=5)
            for p in alive:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        finally:
            self.log.close()
            shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster():
    cluster = RayCluster()
    try:
        yield cluster
    finally:
        cluster.stop()


class RayServe(ServerProcess):
    """`starlift serve ART --ray --address CLUSTER ...` in a subprocess, until its ready line."""

    def __init__(self, cluster: RayCluster, artifact: Path, *args: str, log: Path):
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [str(EXE), "serve", str(artifact), "--ray", "--address", cluster.address, "--port",
             str(cluster.http_port), "--cpus-per-replica", "0.5", "--served-model-name", MODEL, *args],
            stdout=subprocess.PIPE, stderr=self.log, text=True)
        self._wait_ready(log, 180)


def _run_refused(cluster, artifact, *args, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([str(EXE), "serve", str(artifact), "--ray", "--address", cluster.address, "--port",
                           str(cluster.http_port), "--cpus-per-replica", "0.5", *args],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)


# ---- a replica that cannot verify its artifact never serves ------------------------------------------

def test_tampered_artifact_is_refused_by_the_replica(ray_cluster, nano_ort, tmp_path):
    art = tmp_path / "tampered"
    shutil.copytree(nano_ort, art)
    with open(art / "config.json", "a") as f:
        f.write(" ")
    start = time.monotonic()
    proc = _run_refused(ray_cluster, art, tmp_path=tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "ready on" not in proc.stdout
    err = proc.stderr.strip().splitlines()[-1]
    assert "replica" in err and "config.json does not match its sha256" in err, proc.stderr[-2000:]
    assert time.monotonic() - start < 90
    assert not ray_cluster.replica_pids()  # nothing left serving


def test_wrong_public_key_is_refused_by_the_replica(ray_cluster, signing, tmp_path):
    proc = _run_refused(ray_cluster, signing["artifact"], "--public-key", str(signing["other"]), tmp_path=tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "ready on" not in proc.stdout
    err = proc.stderr.strip().splitlines()[-1]
    assert "replica" in err and "not among the trusted keys" in err, proc.stderr[-2000:]


def test_usage_errors_without_a_cluster(nano_ort, tmp_path):
    proc = subprocess.run([str(EXE), "serve", str(nano_ort), "--ray", "--replicas", "2", "--autoscale", "1:2"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--autoscale: not allowed with argument --replicas" in proc.stderr
    proc = subprocess.run([str(EXE), "serve", str(nano_ort), "--replicas", "2"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "--replicas needs --ray" in proc.stderr
    proc = subprocess.run([str(EXE), "serve", str(nano_ort), "--ray", "--autoscale", "3:1"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "MIN <= MAX" in proc.stderr


# ---- two replicas behind Ray's proxy ------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_server(ray_cluster, signing, tmp_path_factory):
    """Two replicas of the signed nano, each checking its signature against the key the command was
    given; one runtime thread and 4 rows each."""
    s = RayServe(ray_cluster, signing["artifact"], "--public-key", str(signing["pub"]), "--replicas", "2",
                 "--threads", "1", "--max-concurrency", "4", log=tmp_path_factory.mktemp("ray-serve") / "serve.log")
    try:
        yield s
    finally:
        code = s.stop()
    assert code == 0, f"starlift serve --ray exited {code} on SIGTERM"
    deadline = time.monotonic() + 30
    while ray_cluster.replica_pids():  # SIGTERM removed the deployment: its replicas end
        assert time.monotonic() < deadline, "the replicas outlived `starlift serve --ray`"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def direct_server(nano_ort, tmp_path_factory):
    """The single-process `starlift serve` of the same artifact: the reference answers."""
    s = ServerProcess(nano_ort, "--served-model-name", MODEL, "--threads", "1",
                      log=tmp_path_factory.mktemp("ray-direct") / "server.log")
    try:
        yield s
    finally:
        s.stop()


def _client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=60, max_retries=0)


def _replicas_by_health(url: str, want: int, tries: int = 60) -> dict[str, int]:
    """Replica id -> pid, from the headers of /health answers, until ``want`` replicas are seen."""
    seen = {}
    with httpx.Client(timeout=10) as c:
        for _ in range(tries):
            r = c.get(f"{url}/health")
            assert r.status_code == 200, r.text
            seen[r.headers["x-starlift-replica"]] = int(r.headers["x-starlift-replica-pid"])
            if len(seen) >= want:
                break
    return seen


def test_two_replicas_answer_like_the_single_process_server(ray_server, direct_server, ray_cluster):
    ray_c, direct_c = _client(ray_server.url), _client(direct_server.url)
    assert [m.id for m in ray_c.models.list().data] == [MODEL]
    for prompt in PROMPTS:
        want = direct_c.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
        got = ray_c.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
        assert got.choices[0].text == want.choices[0].text and got.choices[0].finish_reason == "length"
        assert got.usage.completion_tokens == 24
        streamed = "".join(c.choices[0].text for c in ray_c.completions.create(
            model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True) if c.choices)
        assert streamed == want.choices[0].text

    # both replicas take traffic: concurrent requests, each answer naming its replica
    def one(i):
        raw = ray_c.completions.with_raw_response.create(model=MODEL, prompt=PROMPTS[i % len(PROMPTS)],
                                                         max_tokens=16, temperature=0)
        return raw.headers["x-starlift-replica"], int(raw.headers["x-starlift-replica-pid"]), raw.parse()

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(one, range(18)))
    by_replica = {}
    for replica, pid, completion in answers:
        by_replica.setdefault(replica, set()).add(pid)
        assert completion.usage.completion_tokens == 16
    assert len(by_replica) == 2, f"one replica took all 18 requests: {by_replica}"
    pids = {p for ps in by_replica.values() for p in ps}
    assert pids == ray_cluster.replica_pids()  # the headers name the cluster's two replica processes


def _stream(url: str, result: dict, max_tokens: int) -> None:
    """One streamed completion over httpx; what it got, and how it ended."""
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "temperature": 0}
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as resp:
            result["replica"] = resp.headers.get("x-starlift-replica")
            result["status"] = resp.status_code
            for line in resp.iter_lines():
                if line == "data: [DONE]":
                    result["done"] = True
                elif line.startswith("data: "):
                    result["chunks"] += 1
                    result["last"] = json.loads(line[6:])
    except httpx.HTTPError as e:
        result["error"] = f"{type(e).__name__}: {e}"
    result["end"] = time.monotonic()


def test_killed_replica_fails_only_its_streams_and_is_restarted(ray_server, ray_cluster):
    replicas = _replicas_by_health(ray_server.url, want=2)
    assert len(replicas) == 2, replicas
    n, max_tokens = 8, 400
    results = [{"replica": None, "status": None, "chunks": 0, "done": False, "error": None, "end": None}
               for _ in range(n)]
    threads = [threading.Thread(target=_stream, args=(ray_server.url, r, max_tokens), daemon=True) for r in results]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while any(r["chunks"] < 3 and r["end"] is None for r in results):  # every stream under way
        assert time.monotonic() < deadline, results
        time.sleep(0.02)
    on = {r["replica"] for r in results}
    victim = next(iter(on)) if len(on) == 1 else max(on, key=lambda x: sum(r["replica"] == x for r in results))
    assert replicas[victim] in ray_cluster.replica_pids()  # a process of our cluster, nothing else
    killed_at = time.monotonic()
    os.kill(replicas[victim], signal.SIGKILL)
    for t in threads:
        t.join(90)
    in_flight = [r for r in results if r["replica"] == victim and (r["end"] is None or r["end"] >= killed_at)
                 and not r["done"]]
    failed = [r for r in results if r["error"] is not None]
    assert in_flight, "the streams on the killed replica had all finished before the kill"
    # only the killed replica's streams in flight fail, each with a transport error naming the cut
    assert failed == in_flight, results
    for r in failed:
        assert not r["done"] and "incomplete" in r["error"], r
    for r in results:
        if r not in failed:
            assert r["status"] == 200 and r["done"] and r["last"]["usage"]["completion_tokens"] == max_tokens, r
    print(f"\n{len(failed)} of {n} streams failed (all on the killed replica {victim}): {failed[0]['error']}")

    # the deployment keeps answering at once (the surviving replica) ...
    c = _client(ray_server.url)
    for prompt in PROMPTS:
        assert c.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0).usage.completion_tokens == 8
    # ... and Ray starts a new replica in place of the dead one
    deadline = time.monotonic() + 90
    while True:
        now = _replicas_by_health(ray_server.url, want=2, tries=20)
        if len(now) == 2 and victim not in now:
            break
        assert time.monotonic() < deadline, f"no replacement replica within 90 s: {now}"
        time.sleep(1)
    assert replicas[victim] not in ray_cluster.replica_pids() and len(ray_cluster.replica_pids()) == 2


def test_app_builder_for_serve_configs(nano_ort, signing):
    """`import_path: starlift.serve.ray_serve:app_builder` (Serve config files, KubeRay): the same
    deployment from string args; unknown args are refused with the list of known ones."""
    from ray.serve.deployment import Application

    from starlift.core.errors import UsageError
    from starlift.serve.ray_serve import DEPLOYMENT, app_builder

    app = app_builder({"artifact": str(signing["artifact"]), "max_concurrency": "4", "verify": "true",
                       "public_key": str(signing["pub"])})
    assert isinstance(app, Application) and app._bound_deployment.name == DEPLOYMENT
    options, keys = app._bound_deployment.init_args  # what each replica is built from
    assert options.max_concurrency == 4 and options.verify is True and options.public_key is None
    assert keys == {"build.key.pub": signing["pub"].read_bytes()}
    with pytest.raises(UsageError, match="num_replicas"):
        app_builder({"artifact": str(nano_ort), "num_replicas": 2})
