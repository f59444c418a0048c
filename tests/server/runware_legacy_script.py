"""Drive the legacy, unmodified ``runware`` SDK (PyPI 0.5.24) against our server.

Run by test_runware_legacy.py inside its own virtualenv (the package has the same module name as runware-sdk).

Usage: ``python runware_legacy_script.py WS_URL API_KEY PNG_PATH SINK_URL``; prints one JSON object (the last
stdout line) with what each scenario saw. Only the constructor's ``url=`` points the SDK at us.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import traceback


async def main(url: str, key: str, png_path: str, sink: str) -> dict:
    from runware import IImageUpscale, IInputs, Runware
    from runware.types import ISettings

    out: dict = {}
    rw = Runware(api_key=key, url=url)
    await rw.connect()
    try:
        # 1. sync, a local file path: the SDK uploads it (imageUpload) and sends inputImage=<uuid>
        t0 = time.monotonic()
        r = await rw.imageUpscale(
            IImageUpscale(inputImage=png_path, upscaleFactor=2, outputFormat="PNG", includeCost=True)
        )
        img = r[0]
        out["sync"] = {
            "taskType": img.taskType,
            "imageUUID": img.imageUUID,
            "imageURL": img.imageURL,
            "inputImageUUID": getattr(img, "inputImageUUID", None),
            "cost": img.cost,
            "seconds": time.monotonic() - t0,
        }
        # 2. the new request shape: inputs.image, model, settings
        r2 = await rw.imageUpscale(
            IImageUpscale(
                inputs=IInputs(image=img.imageUUID),
                model="runware:501@1",
                upscaleFactor=2,
                outputFormat="PNG",
                settings=ISettings(steps=2, seed=7),
            )
        )
        out["inputs"] = {"imageUUID": r2[0].imageUUID, "imageURL": r2[0].imageURL}
        # 3. async: an ACK object, then the user polls getResponse
        ack = await rw.imageUpscale(
            IImageUpscale(inputImage=img.imageUUID, upscaleFactor=2, outputFormat="PNG", deliveryMethod="async")
        )
        t1 = time.monotonic()
        res = await rw.getResponse(taskUUID=ack.taskUUID)
        out["async"] = {
            "ack_type": type(ack).__name__,
            "ack_taskUUID": ack.taskUUID,
            "status": getattr(res[0], "status", None),
            "imageURL": res[0].imageURL,
            "poll_seconds": time.monotonic() - t1,
        }
        # 4. webhook: the SDK returns the first frame as its ACK; the sink receives the result
        wh = await rw.imageUpscale(
            IImageUpscale(
                inputImage=img.imageUUID,
                upscaleFactor=2,
                outputFormat="PNG",
                webhookURL=f"{sink}/legacy-webhook",
            )
        )
        out["webhook"] = {"ack_type": type(wh).__name__, "taskUUID": getattr(wh, "taskUUID", None)}
        # 5. an unreadable input: RunwareAPIError with the code and the taskUUID
        try:
            await rw.imageUpscale(IImageUpscale(inputImage="data:image/png;base64,bm90IGFuIGltYWdl", upscaleFactor=2))
            out["error"] = {"raised": False}
        except Exception as e:
            data = getattr(e, "error_data", None) or {}
            out["error"] = {
                "raised": True,
                "type": type(e).__name__,
                "code": getattr(e, "code", None),
                "taskUUID": data.get("taskUUID"),
                "message": str(e)[:300],
            }
    finally:
        await rw.disconnect()
    return out


if __name__ == "__main__":
    try:
        result = asyncio.run(asyncio.wait_for(main(*sys.argv[1:5]), 150))
    except BaseException as e:  # report, do not hang
        result = {"fatal": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    print(json.dumps(result, default=str))
