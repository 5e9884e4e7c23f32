"""A Weir client on a second WebRTC stack (aiortc), written from signaling/PROTOCOL.md.

One process is one member of a room. It joins, optionally publishes audio (a 440 Hz
tone in Opus) and video (frames of one size and one brightness, so a subscriber can
tell whose picture it decodes) in the codec asked for, receives every stream the
server offers, and after `--seconds` leaves. aioice keeps its stock RFC 7675 consent
timing (a check every 4-6 s).

It prints one JSON object per line on stdout: events as they happen, and at the end
a `summary` the Rust test (tests/interop.rs) asserts on. Frames are counted by the
stream the m-section carries *now*, read from the `a=msid` of the latest offer: the
server reuses an m-section for a later stream of the same kind.
"""

import argparse
import asyncio
from fractions import Fraction
import json
import math
import re
import struct
import sys
import time

import av
from aiortc import (
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
import websockets

START = time.monotonic()


def now_ms():
    return round((time.monotonic() - START) * 1000, 1)


def emit(event, **fields):
    print(json.dumps({"event": event, "t": now_ms(), **fields}), flush=True)


class Tone(MediaStreamTrack):
    """20 ms of a 440 Hz tone per frame, paced in real time."""

    kind = "audio"

    def __init__(self):
        super().__init__()
        self.n = 0
        self.t0 = None

    async def recv(self):
        if self.t0 is None:
            self.t0 = time.monotonic()
        due = self.t0 + self.n * 0.02
        await asyncio.sleep(max(0, due - time.monotonic()))
        samples = 960
        data = b"".join(
            struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * (self.n * samples + i) / 48000)))
            for i in range(samples)
        )
        frame = av.AudioFrame(format="s16", layout="mono", samples=samples)
        frame.planes[0].update(data)
        frame.sample_rate = 48000
        frame.pts = self.n * samples
        frame.time_base = Fraction(1, 48000)
        self.n += 1
        return frame


class Picture(MediaStreamTrack):
    """30 frames a second of one size and luma, with a moving bar so encoders send
    real frames."""

    kind = "video"

    def __init__(self, width, height, luma):
        super().__init__()
        self.width, self.height, self.luma = width, height, luma
        self.n = 0
        self.t0 = None

    async def recv(self):
        if self.t0 is None:
            self.t0 = time.monotonic()
        due = self.t0 + self.n / 30
        await asyncio.sleep(max(0, due - time.monotonic()))
        w, h = self.width, self.height
        frame = av.VideoFrame(w, h, "yuv420p")
        bar = (self.n * 4) % w
        row = bytearray([self.luma]) * w
        row[bar : bar + 8] = bytes([255 - self.luma]) * len(row[bar : bar + 8])
        stride = frame.planes[0].line_size
        frame.planes[0].update((bytes(row) + b"\0" * (stride - w)) * h)
        for p in frame.planes[1:]:
            p.update(bytes([128]) * p.buffer_size)
        frame.pts = self.n * 3000
        frame.time_base = Fraction(1, 90000)
        self.n += 1
        return frame


def mids_to_streams(sdp):
    """mid -> (MediaStream id, track id, direction) for each m-section of an SDP."""
    out = {}
    for section in re.split(r"\r?\nm=", sdp)[1:]:
        mid = re.search(r"^a=mid:(\S+)", section, re.M)
        msid = re.search(r"^a=msid:(\S+) (\S+)", section, re.M)
        direction = re.search(r"^a=(sendrecv|sendonly|recvonly|inactive)$", section, re.M)
        if mid:
            out[mid.group(1)] = (
                msid.group(1) if msid else None,
                msid.group(2) if msid else None,
                direction.group(1) if direction else "sendrecv",
            )
    return out


class Member:
    def __init__(self, args):
        self.args = args
        self.ws = None
        self.pub = None
        self.sub = None
        self.sub_mids = {}  # mid -> stream id carried now
        self.offers = []
        self.streams = {}  # stream id -> counts
        self.errors = []
        self.messages = []
        self.consumers = []
        self.left = None
        self.close = None
        self.ice_servers = None
        self.leaving = False

    def stats(self, stream_id):
        return self.streams.setdefault(
            stream_id,
            {"video": 0, "audio": 0, "first_video_ms": None, "sizes": [], "lumas": [],
             "audio_level": 0.0, "codec": None, "seconds": {}},
        )

    async def send(self, msg):
        try:
            await self.ws.send(json.dumps(msg))
        except websockets.ConnectionClosedOK:
            # After our `leave`, the server may close before an answer we were still
            # making (to an offer sent as another member left) goes out.
            if not self.leaving:
                raise

    async def run(self):
        a = self.args
        join = json.loads(a.join)
        self.published = asyncio.Event()
        self.pub_answer = asyncio.get_running_loop().create_future()
        async with websockets.connect(a.ws, max_size=1 << 20) as ws:
            self.ws = ws
            await self.send(join)
            reader = asyncio.create_task(self.read())
            try:
                await asyncio.wait_for(self.published_or_joined(), 15)
                if a.publish != "none":
                    await self.start_publishing()
                await asyncio.sleep(a.seconds)
                self.leaving = True
                await self.send({"type": "leave"})
                await asyncio.wait_for(reader, 10)
            except Exception as e:  # report, do not hide
                self.errors.append(f"{type(e).__name__}: {e}")
                reader.cancel()
            finally:
                self.close = {"code": ws.close_code, "reason": ws.close_reason}
        for c in self.consumers:
            c.cancel()
        for pc in (self.pub, self.sub):
            if pc:
                await pc.close()
        emit("summary", streams=self.streams, errors=self.errors, left=self.left,
             joined_ms=getattr(self, "joined_ms", None),
             close=self.close, offers=self.offers, iceServers=self.ice_servers)

    async def published_or_joined(self):
        while not hasattr(self, "joined"):
            await asyncio.sleep(0.01)

    async def read(self):
        async for raw in self.ws:
            msg = json.loads(raw)
            t = msg.get("type")
            if t == "joined":
                self.joined = msg
                self.joined_ms = now_ms()
                self.ice_servers = msg.get("iceServers")
                emit("joined", members=len(msg.get("members", [])))
            elif t == "published":
                self.published.set()
            elif t == "answer" and msg.get("target") == "publisher":
                if not self.pub_answer.done():
                    self.pub_answer.set_result(msg["sdp"])
                else:
                    await self.pub.setRemoteDescription(RTCSessionDescription(msg["sdp"], "answer"))
            elif t == "offer" and msg.get("target") == "subscriber":
                await self.on_subscriber_offer(msg["sdp"])
            elif t == "error":
                emit("error", code=msg.get("code"), message=msg.get("message"))
                self.errors.append(f"server error {msg.get('code')}: {msg.get('message')}")
            elif t == "left":
                self.left = msg.get("reason")
            elif t in ("streamAdded", "streamRemoved", "memberJoined", "memberLeft"):
                emit(t, streamId=msg.get("streamId") or (msg.get("stream") or {}).get("streamId"))

    async def start_publishing(self):
        a = self.args
        await self.send({"type": "publish", "audio": True, "video": True})
        await asyncio.wait_for(self.published.wait(), 10)
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pub = pc
        pc.addTransceiver(Tone(), direction="sendonly")
        video = pc.addTransceiver(Picture(a.width, a.height, a.luma), direction="sendonly")
        want = f"video/{a.publish}".lower()
        codecs = [c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType.lower() == want]
        if not codecs:
            raise RuntimeError(f"aiortc has no {want}")
        video.setCodecPreferences(codecs)
        await pc.setLocalDescription(await pc.createOffer())
        await self.send({"type": "offer", "target": "publisher", "sdp": pc.localDescription.sdp})
        answer = await asyncio.wait_for(self.pub_answer, 10)
        emit("publisherAnswer", sdp=answer)
        await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))

    async def on_subscriber_offer(self, sdp):
        self.offers.append(sdp)
        emit("subscriberOffer", n=len(self.offers), sdp=sdp)
        if self.sub is None:
            self.sub = RTCPeerConnection(RTCConfiguration(iceServers=[]))

            @self.sub.on("track")
            def on_track(track):
                emit("track", kind=track.kind, id=track.id)

            @self.sub.on("connectionstatechange")
            def on_state():
                emit("subscriberState", state=self.sub.connectionState)

        await self.sub.setRemoteDescription(RTCSessionDescription(sdp, "offer"))
        mids = mids_to_streams(sdp)
        for t in self.sub.getTransceivers():
            if t.mid in mids:
                self.sub_mids[t.mid] = mids[t.mid][0] if mids[t.mid][2] in ("sendonly", "sendrecv") else None
                if not getattr(t, "_weir_consumer", False):
                    t._weir_consumer = True
                    self.consumers.append(asyncio.create_task(self.consume(t)))
        await self.sub.setLocalDescription(await self.sub.createAnswer())
        await self.send({"type": "answer", "target": "subscriber", "sdp": self.sub.localDescription.sdp})

    async def consume(self, transceiver):
        track = transceiver.receiver.track
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            stream_id = self.sub_mids.get(transceiver.mid)
            if stream_id is None:
                continue
            s = self.stats(stream_id)
            second = str(int((time.monotonic() - START)))
            if track.kind == "video":
                s["video"] += 1
                s["seconds"][second] = s["seconds"].get(second, 0) + 1
                if s["first_video_ms"] is None:
                    s["first_video_ms"] = now_ms()
                    emit("firstFrame", streamId=stream_id)
                size = [frame.width, frame.height]
                if size not in s["sizes"]:
                    s["sizes"].append(size)
                plane = frame.planes[0]
                row = bytes(plane)[(frame.height // 2) * plane.line_size :][: frame.width]
                luma = sorted(row)[len(row) // 2]  # the median: the bar is thin
                if luma not in s["lumas"] and len(s["lumas"]) < 16:
                    s["lumas"].append(luma)
            else:
                s["audio"] += 1
                pcm = bytes(frame.planes[0])
                vals = struct.unpack(f"<{len(pcm) // 2}h", pcm[: len(pcm) // 2 * 2])
                rms = math.sqrt(sum(v * v for v in vals) / max(1, len(vals)))
                s["audio_level"] = max(s["audio_level"], round(rms, 1))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ws", required=True)
    p.add_argument("--join", required=True, help="the join message, JSON")
    p.add_argument("--publish", default="none", choices=["none", "h264", "vp8"])
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--luma", type=int, default=60)
    args = p.parse_args()
    asyncio.run(Member(args).run())


if __name__ == "__main__":
    sys.exit(main())
