"""SpacerClient over several replicas: round-robin spread, complete results, retries past a dead one."""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from server.client import SpacerClient, channel_target, service_config
from spacer_core.testing import extractor_json, make_classifier, make_image
from spacer_core.testing import fs_loc as fs
from tests.server.test_lifecycle import start_serve
from tests.support.grpc_server import running_server


def test_several_addresses_become_one_balanced_target():
    assert channel_target("127.0.0.1:5") == "127.0.0.1:5"
    assert channel_target("dns:///spacer.default.svc:50051") == "dns:///spacer.default.svc:50051"
    assert channel_target(["127.0.0.1:5", "localhost:6"]) == "ipv4:127.0.0.1:5,127.0.0.1:6"
    assert channel_target(["[::1]:5", "::1:6"]) == "ipv6:[::1]:5,[::1]:6"
    with pytest.raises(ValueError, match="host:port"):
        channel_target(["127.0.0.1:5", "nowhere"])
    with pytest.raises(ValueError, match="mix"):
        channel_target(["127.0.0.1:5", "[::1]:6"])
    config = service_config()
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    retried = {n["method"] for n in config["methodConfig"][0]["name"]}
    assert "ClassifyImage" in retried and "TrainClassifier" not in retried and "RunJob" not in retried
    assert config["methodConfig"][0]["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]


def test_an_idempotent_call_is_retried_on_the_live_replica():
    with running_server() as live:
        stopped = running_server()
        dead = stopped.__enter__()
        dead_address = dead.address
        stopped.__exit__(None, None, None)
        with SpacerClient([dead_address, live.address], timeout=20) as client:
            # Every call succeeds although half the addresses refuse connections.
            for _ in range(6):
                assert client.list_models() == []
        with SpacerClient([dead_address], timeout=5, max_attempts=2) as lonely:
            with pytest.raises(grpc.RpcError) as err:
                lonely.list_models()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def _ok_calls(log_text: str) -> int:
    count = 0
    for line in log_text.splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (
            entry.get("method") == "ClassifyImage"
            and entry.get("status") == "OK"
            and str(entry.get("token", "")).startswith("t")
        ):
            count += 1
    return count


@pytest.mark.slow
def test_three_replicas_share_the_work_and_a_killed_one_loses_nothing(tmp_path, efficientnet_weights):  # noqa: F811
    image = make_image(tmp_path / "img.png", 96, 72, seed=5)
    clf = make_classifier(tmp_path / "clf.pkl")
    extractor = extractor_json(efficientnet_weights.path, efficientnet_weights.sha256)
    points = [(5, 6), (30, 40), (60, 80)]

    replicas = []
    try:
        for i in range(3):
            folder = tmp_path / f"replica{i}"
            folder.mkdir()
            proc, port = start_serve(folder, "--workers", "2", "--log-format", "json", "--grace", "0")
            replicas.append((proc, port, folder))
        addresses = [f"127.0.0.1:{port}" for _, port, _ in replicas]
        # Each replica builds its network before the measured calls, so none is
        # still compiling (and has served nothing) when the victim is killed.
        for address in addresses:
            with SpacerClient(address, timeout=180) as warm:
                warm.classify_image(extractor, points, fs(image), fs(clf), job_token="warm")
        total, kill_after = 60, 15
        done = threading.Event()
        finished: list[str] = []
        lock = threading.Lock()

        with SpacerClient(addresses, timeout=120) as client:

            def one(i: int):
                response = client.classify_image(extractor, points, fs(image), fs(clf), job_token=f"t{i}")
                with lock:
                    finished.append(response.job_token)
                    if len(finished) >= kill_after:
                        done.set()
                return response

            with ThreadPoolExecutor(6) as pool:
                futures = [pool.submit(one, i) for i in range(total)]
                assert done.wait(180), "the first calls did not finish"
                # The victim has answered some calls before it dies.
                deadline = time.monotonic() + 60
                while (
                    not _ok_calls((replicas[1][2] / "serve.log").read_text()) and time.monotonic() < deadline
                ):
                    time.sleep(0.1)
                victim = replicas[1][0]
                victim.send_signal(signal.SIGKILL)  # no drain: in-flight calls are cut
                victim.wait(30)
                responses = [f.result(180) for f in futures]

        # Complete: every call answered once, with every point scored, identically.
        assert sorted(r.job_token for r in responses) == sorted(f"t{i}" for i in range(total))
        assert all(len(r.scores) == len(points) and r.valid_rowcol for r in responses)
        reference = [x for s in responses[0].scores for x in s.scores]
        assert all(
            [x for s in r.scores for x in s.scores] == pytest.approx(reference, abs=1e-5) for r in responses
        )
        # Spread: every replica served some of them (read from each one's JSON log).
        served = [_ok_calls((folder / "serve.log").read_text()) for _, _, folder in replicas]
        assert all(n >= 1 for n in served), served
        survivors = served[0] + served[2]
        assert survivors >= total - served[1]
        print(f"ClassifyImage calls served per replica (replica1 killed after {kill_after}): {served}")
    finally:
        for proc, _, _ in replicas:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _, _ in replicas:
            try:
                proc.wait(30)
            except Exception:
                proc.kill()
