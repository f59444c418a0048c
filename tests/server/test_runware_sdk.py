"""The official ``runware-sdk`` (import ``runware``), unmodified, pointed at a real ``ccsr serve`` with
``ws_base_url=`` / ``http_base_url=``, over both transports (protocols.md C.2 T1)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import uuid

import httpx
import pytest
from PIL import Image
from runware import Runware, RunwareError, file_to_data_uri


def image_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


pytestmark = pytest.mark.timeout(240)

TRANSPORTS = ("websocket", "rest")


def client(server, transport: str, key: str | None = None, **kw) -> Runware:
    return Runware(
        api_key=key or server.api_key,
        transport=transport,
        ws_base_url=server.ws,
        http_base_url=f"{server.http}/v1",
        **kw,
    )


def upscale_task(image: str, **kw) -> dict:
    return {
        "taskType": "upscale",
        "model": "runware:501@1",
        "inputs": {"image": image},
        "upscaleFactor": 2,
        "outputFormat": "PNG",
        **kw,
    }


def fetch_image(url: str) -> bytes:
    r = httpx.get(url, timeout=30)
    assert r.status_code == 200, r.text
    return r.content


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_upload_upscale_sync_async_chain(server, input_png, transport):
    async def go():
        async with client(server, transport) as rw:
            up = await rw.image_upload({"image": file_to_data_uri(input_png)})
            assert set(up[0]) >= {"taskType", "taskUUID", "imageUUID", "imageURL"}
            assert fetch_image(up[0]["imageURL"]) == input_png

            # sync: one round trip, a URL output, the cost when asked
            s = await rw.run(
                upscale_task(
                    up[0]["imageUUID"],
                    includeCost=True,
                    deliveryMethod="sync",
                    settings={"seed": 3, "steps": 2},
                )
            )
            item = s[0]
            assert item["taskType"] == "upscale" and item["inputImageUUID"] == up[0]["imageUUID"]
            assert item["cost"] == 0 and "status" not in item
            out = fetch_image(item["imageURL"])
            assert out[:8] == b"\x89PNG\r\n\x1a\n" and image_size(out) == (96, 80)

            # async (the SDK's default): ACK, then getResponse polls with progress, base64 output
            progress = []
            from runware.types.sdk import RunOptions

            a = await rw.run(
                upscale_task(
                    up[0]["imageUUID"],
                    outputType="base64Data",
                    settings={
                        "seed": 3,
                        "steps": 2,
                        "CFGScale": 1.0,
                        "controlNetWeight": 1.0,
                        "positivePrompt": "sharp",
                    },
                ),
                RunOptions(on_progress=progress.append),
            )
            assert a[0]["status"] == "success"
            data = base64.b64decode(a[0]["imageBase64Data"])
            assert image_size(data) == (96, 80)

            # chain: an output (its imageUUID, or its imageURL, which the server reads from its own store:
            # the fetcher would refuse a loopback URL) is a valid input; a data URI output in another format
            c = await rw.run(
                upscale_task(
                    item["imageUUID"] if transport == "websocket" else item["imageURL"],
                    outputType="dataURI",
                    outputFormat="WEBP",
                    outputQuality=80,
                    deliveryMethod="sync",
                )
            )
            uri = c[0]["imageDataURI"]
            assert uri.startswith("data:image/webp;base64,")
            assert image_size(base64.b64decode(uri.split(",", 1)[1])) == (192, 160)

    asyncio.run(go())


def test_url_input_webhook_and_upload_endpoint(server, sink, input_png):
    """The input is fetched from an (allow-listed) URL; the result is POSTed to the webhook and PUT to the
    uploadEndpoint, while the SDK still gets it by polling."""
    sink.files["/inputs/in.png"] = input_png

    async def go():
        async with client(server, "websocket") as rw:
            tid = str(uuid.uuid4())
            r = await rw.run(
                upscale_task(
                    f"{sink.base}/inputs/in.png",
                    taskUUID=tid,
                    webhookURL=f"{sink.base}/hook/{tid}",
                    uploadEndpoint=f"{sink.base}/put/{tid}.png",
                )
            )
            return tid, r

    tid, r = asyncio.run(go())
    assert r[0]["status"] == "success"
    hook = sink.wait_for(lambda q: q["method"] == "POST" and q["path"] == f"/hook/{tid}")
    body = json.loads(hook["body"])
    assert body["data"][0]["taskUUID"] == tid and body["data"][0]["status"] == "success"
    assert body["data"][0]["imageURL"] == r[0]["imageURL"]
    put = sink.wait_for(lambda q: q["method"] == "PUT" and q["path"] == f"/put/{tid}.png")
    assert put["headers"]["content-type"] == "image/png"
    assert image_size(put["body"]) == (96, 80)
    assert put["body"] == fetch_image(r[0]["imageURL"])


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_bad_request_raises_validation_error(server, input_png, transport):
    async def go():
        async with client(server, transport) as rw:
            with pytest.raises(RunwareError) as e:
                await rw.run({"taskType": "upscale", "model": "runware:501@1", "deliveryMethod": "sync"})
            assert e.value.code == "validation" and e.value.task_uuid and e.value.parameter == "inputs.image"
            tid = str(uuid.uuid4())
            with pytest.raises(RunwareError) as e2:
                await rw.run(
                    upscale_task(file_to_data_uri(input_png), taskUUID=tid, upscaleFactor=5, deliveryMethod="sync")
                )
            assert e2.value.code == "validation" and e2.value.task_uuid == tid
            if transport == "rest":
                assert e.value.status_code == 400

    asyncio.run(go())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_bad_key_raises_auth_error(server, input_png, transport):
    async def go():
        rw = client(server, transport, key="wrong-key", max_retries=0, max_reconnect_attempts=0)
        try:
            with pytest.raises(RunwareError) as e:
                await rw.connect()
                await rw.image_upload({"image": file_to_data_uri(input_png)})
            assert e.value.code == "auth"
            if transport == "rest":
                assert e.value.status_code == 401
        finally:
            await rw.close()

    asyncio.run(go())


class DropProxy:
    """A loopback TCP proxy whose live connections the test can cut (a network drop mid-job)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.conns: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self.accepted = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, cr, cw):
        self.accepted += 1
        sr, sw = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.conns.append((cw, sw))

        async def pipe(r, w):
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(cr, sw), pipe(sr, cw))

    def drop_all(self) -> None:
        for cw, sw in self.conns:
            for w in (cw, sw):
                t = w.transport
                if t is not None:
                    t.abort()
        self.conns.clear()

    async def close(self):
        self.drop_all()
        self.server.close()


def test_reconnect_in_the_middle_of_an_async_job(server, input_png):
    """The socket dies after the ACK while the job runs; the SDK reconnects with its connectionSessionUUID,
    resumes getResponse polling on the new socket, and gets the result (job state outlives connections)."""

    async def go():
        proxy = DropProxy(server.port)
        pport = await proxy.start()
        tid = str(uuid.uuid4())
        rw = Runware(
            api_key=server.api_key,
            transport="websocket",
            ws_base_url=f"ws://127.0.0.1:{pport}/v1",
            retry_delay=200,
        )
        await rw.connect()
        try:
            run = asyncio.create_task(
                rw.run(upscale_task(file_to_data_uri(input_png), taskUUID=tid, settings={"steps": 8, "seed": 1}))
            )
            # wait (over REST, another connection) until the job exists and is not finished, then cut
            async with httpx.AsyncClient(timeout=30) as h:
                for _ in range(400):
                    r = await h.post(
                        f"{server.http}/v1",
                        json=[{"taskType": "getResponse", "taskUUID": tid}],
                        headers={"Authorization": f"Bearer {server.api_key}"},
                    )
                    if r.status_code == 200 and r.json()["data"][0].get("status") == "processing":
                        break
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError(f"job never showed up as processing: {r.text}")
            proxy.drop_all()
            result = await asyncio.wait_for(run, 180)
            assert result[0]["status"] == "success" and result[0]["taskUUID"] == tid
            # links are built from the request's Host (here the proxy): fetch the same path from the server
            path = result[0]["imageURL"].split("/images/", 1)[1]
            async with httpx.AsyncClient(timeout=30) as h:
                img = await h.get(f"{server.http}/images/{path}")
            assert image_size(img.content) == (96, 80)
            assert proxy.accepted >= 2
        finally:
            await rw.close()
            await proxy.close()

    asyncio.run(go())
    assert "resumed" in server.log()
