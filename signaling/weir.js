// Weir browser SDK: one ES module, no build step, no dependencies.
//
//   import { WeirRoom } from "/sdk/weir.js";
//   const room = new WeirRoom({ sdkAppID, userID, userSig, roomID, privateMapKey });
//   room.addEventListener("remoteStream", (e) => video.srcObject = e.detail.stream);
//   await room.start();            // join, then publish camera + microphone
//
// The API follows the mini program `<webrtc-room>` component where a browser allows it:
// start / pause / resume / stop / switchCamera / sendTextMsg and room events. It speaks
// Weir's signaling protocol, version 1 (signaling/PROTOCOL.md): two peer connections,
// the publisher one offered by the client, the subscriber one offered by the server.
// Types: weir.d.ts next to this file.

export const PROTOCOL = 1;

const REQUEST_TIMEOUT_MS = 10000;
const PING_EVERY_MS = 10000;
const ICE_GATHER_MS = 1500;
const RECONNECT_DELAYS_MS = [500, 1000, 2000, 4000, 8000];
/** An ICE restart that has not reconnected in this long gives way to a rejoin. */
const ICE_RESTART_MS = 5000;
// A client's peer connections (PROTOCOL.md): what it sends, what it receives, and
// the screen it shares.
const TARGETS = ["publisher", "subscriber", "screen"];

/**
 * Orders codec capabilities so that H.264 (packetization-mode 1, constrained baseline
 * first) leads: RTMP and HTTP-FLV players then get the video without transcoding.
 * @param {RTCRtpCodec[]} codecs
 */
export function preferH264(codecs) {
  const score = (c) => {
    const mime = c.mimeType.toLowerCase();
    const fmtp = c.sdpFmtpLine || "";
    if (mime === "video/h264") {
      if (!fmtp.includes("packetization-mode=1")) return 3;
      return fmtp.includes("profile-level-id=42e01f") ? 0 : 1;
    }
    if (mime === "video/rtx" || mime === "video/red" || mime === "video/ulpfec") return 2;
    return 4;
  };
  return [...codecs].sort((a, b) => score(a) - score(b));
}

/**
 * Orders codec capabilities so that `name` ("h264", the default, or "vp8") leads.
 * H.264 reaches RTMP/HTTP-FLV players and mini programs without transcoding; VP8 is
 * what a browser without H.264 (Firefox without its OpenH264 plugin) can decode, so
 * a room with such members publishes VP8. A browser that lacks the codec keeps its
 * own order.
 * @param {RTCRtpCodec[]} codecs
 * @param {string} [name]
 */
export function preferCodec(codecs, name = "h264") {
  if (name === "h264") return preferH264(codecs);
  const want = `video/${name}`.toLowerCase();
  const score = (c) => {
    const mime = c.mimeType.toLowerCase();
    if (mime === want) return 0;
    if (mime === "video/rtx" || mime === "video/red" || mime === "video/ulpfec") return 1;
    return 2;
  };
  return [...codecs].sort((a, b) => score(a) - score(b));
}

/** A promise that settles when `pc` has gathered its candidates, or after `ms`. */
function gathered(pc, ms) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (pc.iceGatheringState === "complete") {
        pc.removeEventListener("icegatheringstatechange", done);
        resolve();
      }
    };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, ms);
  });
}

/** An error refused by the server: `code` as in PROTOCOL.md, `request` the message type. */
export class WeirError extends Error {
  constructor(code, message, request, tencentCode) {
    super(message);
    this.name = "WeirError";
    this.code = code;
    this.request = request;
    this.tencentCode = tencentCode;
  }
}

/**
 * One participant in one room.
 *
 * Events (CustomEvent, payload in `detail`): `joined`, `memberJoined`, `memberLeft`,
 * `streamAdded`, `streamRemoved`, `streamMuted`, `remoteStream` (a stream's media is
 * ready to render: `{streamId, stream, info}`), `localStream`, `published`,
 * `textMessage`, `linkMic` (a live room's stage: `{action: "request" | "accept" |
 * "reject" | "kick", userID, reason}`, PROTOCOL.md), `error` (a WeirError or a media
 * failure), `connectionState`
 * (`{target, state}`), `reconnecting`, `reconnected` (`{target, iceRestart: true}` for an
 * ICE restart within the session, `{}` for a rejoin), `left` (`{reason}`),
 * `congestion` (this client's downlink as the server sees it:
 * `{state: "normal"|"warning"|"congested", estimate, paused, lowered}`, `paused`
 * being the streams whose video the server withholds because the link cannot carry
 * it, their audio continuing; `lowered` the simulcast streams sent on a lower layer), `publishTarget` (`{streamId, userID, bitrate, policy}`: the rate
 * the room asks a publisher for; the browser also gets it as REMB for its own stream),
 * `publishLayers` (`{active}`: the simulcast layers, by rid, still sent; the SDK switches
 * the others off as the server asks), `screenShared` and `screenEnded` (this client's
 * screen share, `publishScreen`: its stream info; ended by `unpublishScreen`, the
 * browser's "stop sharing", or its connection's loss). A remote screen share is a
 * stream like any other whose info has `screen: true`.
 */
export class WeirRoom extends EventTarget {
  /** @param {import("./weir.d.ts").WeirOptions} options */
  constructor(options) {
    super();
    this.options = { autoSubscribe: true, reconnect: true, ...options };
    /** @type {WebSocket|null} */ this.ws = null;
    /** @type {RTCPeerConnection|null} */ this.publisher = null;
    /** @type {RTCPeerConnection|null} */ this.subscriber = null;
    /** The screen share's connection (`publishScreen`). */
    /** @type {RTCPeerConnection|null} */ this.screen = null;
    /** @type {MediaStream|null} */ this.localStream = null;
    /** Remote streams by id: `{info, stream}` (stream null until media arrives). */
    this.streams = new Map();
    /** Other members by userID. */
    this.members = new Set();
    /** `idle`, `joining`, `joined`, `reconnecting`, `left`. */
    this.state = "idle";
    this.iceServers = [];
    this.publishing = null;
    this.ownStream = null;
    /** The screen being shared: `{stream, info, maxBitrate}`, or null. */
    this.sharing = null;
    this.rttMs = null;
    this._waiters = [];
    this._subscriberChain = Promise.resolve();
    this._resetPeers();
    this._timer = null;
    this._leaving = false;
  }

  /** The websocket URL: `options.url`, else `/ws` on the page's host. */
  get url() {
    if (this.options.url) return this.options.url;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    return `${scheme}://${location.host}/ws`;
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  /** Shorthand for `addEventListener(type, (e) => handler(e.detail))`. */
  on(type, handler) {
    this.addEventListener(type, (e) => handler(e.detail));
    return this;
  }

  // ---- room life ------------------------------------------------------------------

  /** Joins the room and publishes (`<webrtc-room>`'s start). */
  async start(publish = { audio: true, video: true }) {
    await this.join();
    if (publish) await this.publish(publish);
  }

  /** Joins the room; resolves with the `joined` message. */
  async join() {
    this._leaving = false;
    this.state = "joining";
    await this._open();
    const o = this.options;
    const msg = {
      type: "join",
      protocol: PROTOCOL,
      sdkAppID: o.sdkAppID,
      userID: o.userID,
      userSig: o.userSig,
      privateMapKey: o.privateMapKey,
      autoSubscribe: o.autoSubscribe,
    };
    if (o.strRoomID !== undefined) msg.strRoomID = String(o.strRoomID);
    else msg.roomID = Number(o.roomID);
    if (o.congestionPolicy) msg.congestionPolicy = o.congestionPolicy;
    const joined = await this._request(msg, (m) => m.type === "joined");
    this.state = "joined";
    this.iceServers = joined.iceServers || [];
    for (const m of joined.members || []) {
      this.members.add(m.userID);
      for (const s of m.streams || []) this._streamInfo(s);
    }
    this._timer = setInterval(() => this._send({ type: "ping", ts: Date.now() }), PING_EVERY_MS);
    this._emit("joined", joined);
    return joined;
  }

  /** Leaves: stops publishing and receiving, closes the session (`stop`). */
  async stop() {
    await this.leave();
  }

  async leave() {
    this._leaving = true;
    if (this.ws && this.ws.readyState === WebSocket.OPEN && this.state === "joined") {
      try {
        await this._request({ type: "leave" }, (m) => m.type === "left", 3000);
      } catch (_) {
        /* closing anyway */
      }
    }
    this._teardown();
    if (this.localStream) this.localStream.getTracks().forEach((t) => t.stop());
    if (this.sharing && this.sharing.captured) this.sharing.stream.getTracks().forEach((t) => t.stop());
    this.localStream = null;
    this.publishing = null;
    this.sharing = null;
    this.state = "left";
  }

  _resetPeers() {
    for (const target of TARGETS) this[target] = null;
    this._pendingCandidates = { publisher: [], subscriber: [], screen: [] };
    this._iceTimers = { publisher: null, subscriber: null, screen: null };
    this._iceRestarting = { publisher: false, subscriber: false, screen: false };
  }

  _teardown() {
    clearInterval(this._timer);
    this._timer = null;
    for (const w of this._waiters) w.reject(new WeirError(0, "session closed", w.request));
    this._waiters = [];
    for (const target of TARGETS) if (this[target]) this[target].close();
    this._subscriberChain = Promise.resolve();
    for (const t of Object.values(this._iceTimers)) clearTimeout(t);
    this._resetPeers();
    if (this.ws) {
      this.ws.onclose = null;
      this.ws.close();
    }
    this.ws = null;
    for (const id of [...this.streams.keys()]) this._removeStream(id);
    this.members.clear();
  }

  // ---- publishing -----------------------------------------------------------------

  /**
   * Publishes camera and/or microphone (or `options.stream`). H.264 is preferred so
   * RTMP/HTTP-FLV players need no transcoding.
   * @param {import("./weir.d.ts").PublishOptions} [options]
   */
  async publish(options = {}) {
    const audio = options.audio !== false;
    const video = options.video !== false;
    let media = options.stream || this.localStream;
    if (!media) {
      media = await navigator.mediaDevices.getUserMedia({
        audio: audio ? { echoCancellation: true, noiseSuppression: true } : false,
        video: video
          ? { width: { ideal: options.width || 640 }, height: { ideal: options.height || 360 },
              frameRate: { ideal: options.frameRate || 30 }, facingMode: this._facing || "user" }
          : false,
      });
    }
    this.localStream = media;
    this._emit("localStream", { stream: media });
    const published = await this._request(
      {
        type: "publish",
        audio,
        video,
        ...(options.minBitrate ? { minBitrate: options.minBitrate } : {}),
        ...(options.maxBitrate ? { maxBitrate: options.maxBitrate } : {}),
      },
      (m) => m.type === "published" && !m.stream.screen,
    );
    this.ownStream = published.stream;
    const pc = this._peer("publisher");
    for (const track of media.getTracks()) {
      if ((track.kind === "audio" && !audio) || (track.kind === "video" && !video)) continue;
      const init = { direction: "sendonly", streams: [media] };
      if (track.kind === "video" && options.simulcast) {
        init.sendEncodings = [
          { rid: "q", scaleResolutionDownBy: 4, maxBitrate: 150000 },
          { rid: "h", scaleResolutionDownBy: 2, maxBitrate: 500000 },
          { rid: "f", maxBitrate: options.maxBitrate || 1500000 },
        ];
      } else if (track.kind === "video" && options.maxBitrate) {
        init.sendEncodings = [{ maxBitrate: options.maxBitrate }];
      }
      const t = pc.addTransceiver(track, init);
      if (track.kind === "video" && t.setCodecPreferences && RTCRtpSender.getCapabilities) {
        const caps = RTCRtpSender.getCapabilities("video");
        if (caps) t.setCodecPreferences(preferCodec(caps.codecs, options.videoCodec));
      }
    }
    await pc.setLocalDescription(await pc.createOffer());
    await gathered(pc, ICE_GATHER_MS);
    const answer = await this._request(
      { type: "offer", target: "publisher", sdp: pc.localDescription.sdp },
      (m) => m.type === "answer" && m.target === "publisher",
    );
    await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
    await this._flushCandidates("publisher");
    this.publishing = {
      audio,
      video,
      simulcast: !!options.simulcast,
      maxBitrate: options.maxBitrate,
      videoCodec: options.videoCodec,
    };
    this._emit("published", published.stream);
    return published.stream;
  }

  /** Stops publishing (the tracks stay open for a later `publish`). */
  async unpublish() {
    if (!this.publishing) return;
    this._send({ type: "unpublish" });
    if (this.publisher) this.publisher.close();
    this.publisher = null;
    this.publishing = null;
    this.ownStream = null;
  }

  /**
   * Shares a screen beside the camera: a second stream (`…_aux`, PROTOCOL.md "Screen
   * share"; privilege 0x40) on its own connection, video only, which a short link
   * keeps before the cameras. From `options.stream`, else `getDisplayMedia` (then the
   * browser's "stop sharing" ends it too). Resolves with the stream's info.
   * @param {import("./weir.d.ts").ScreenOptions} [options]
   */
  async publishScreen(options = {}) {
    if (this.sharing) throw new WeirError(400, "already sharing a screen", "publish");
    const captured = !options.stream;
    const media = options.stream || (await navigator.mediaDevices.getDisplayMedia({
      video: { frameRate: { ideal: options.frameRate || 15 } },
      audio: false,
    }));
    const track = media.getVideoTracks()[0];
    if (!track) throw new WeirError(400, "nothing to share: the stream has no video track", "publish");
    // Text and lines stay sharp; the encoder gives up frame rate first.
    if ("contentHint" in track && !track.contentHint) track.contentHint = "detail";
    const published = await this._request(
      {
        type: "publish",
        audio: false,
        video: true,
        screen: true,
        ...(options.maxBitrate ? { maxBitrate: options.maxBitrate } : {}),
      },
      (m) => m.type === "published" && m.stream.screen,
    );
    const sharing = { stream: media, info: published.stream, maxBitrate: options.maxBitrate, captured };
    this.sharing = sharing;
    track.addEventListener("ended", () => {
      if (this.sharing === sharing) this.unpublishScreen();
    });
    const pc = this._peer("screen");
    const t = pc.addTransceiver(track, {
      direction: "sendonly",
      streams: [media],
      ...(options.maxBitrate ? { sendEncodings: [{ maxBitrate: options.maxBitrate }] } : {}),
    });
    if (t.setCodecPreferences && RTCRtpSender.getCapabilities) {
      const caps = RTCRtpSender.getCapabilities("video");
      if (caps) t.setCodecPreferences(preferCodec(caps.codecs, options.videoCodec));
    }
    await pc.setLocalDescription(await pc.createOffer());
    await gathered(pc, ICE_GATHER_MS);
    const answer = await this._request(
      { type: "offer", target: "screen", sdp: pc.localDescription.sdp },
      (m) => m.type === "answer" && m.target === "screen",
    );
    await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
    await this._flushCandidates("screen");
    this._emit("screenShared", published.stream);
    return published.stream;
  }

  /** Stops sharing the screen (the camera goes on). */
  async unpublishScreen() {
    if (!this.sharing) return;
    this._send({ type: "unpublish", screen: true });
    this._screenEnded();
  }

  _screenEnded() {
    const sharing = this.sharing;
    if (this.screen) this.screen.close();
    this.screen = null;
    this.sharing = null;
    if (sharing && sharing.captured) sharing.stream.getTracks().forEach((t) => t.stop());
    if (sharing) this._emit("screenEnded", sharing.info);
  }

  /** Mutes what is sent (`<webrtc-room>`'s pause): tracks disabled, the room told. */
  pause() {
    this.muteAudio(true);
    this.muteVideo(true);
  }

  resume() {
    this.muteAudio(false);
    this.muteVideo(false);
  }

  muteAudio(muted) {
    this._mute("audio", muted);
  }

  muteVideo(muted) {
    this._mute("video", muted);
  }

  _mute(kind, muted) {
    if (!this.localStream) return;
    for (const t of this.localStream.getTracks()) if (t.kind === kind) t.enabled = !muted;
    if (this.publishing) this._send({ type: "mute", kind, muted });
  }

  /** Switches to the next camera (front/back on phones), replacing the sent track. */
  async switchCamera() {
    const devices = (await navigator.mediaDevices.enumerateDevices()).filter(
      (d) => d.kind === "videoinput",
    );
    const current = this.localStream && this.localStream.getVideoTracks()[0];
    const currentId = current && current.getSettings().deviceId;
    const i = devices.findIndex((d) => d.deviceId === currentId);
    const next = devices[(i + 1) % Math.max(devices.length, 1)];
    this._facing = this._facing === "environment" ? "user" : "environment";
    const constraints = next && next.deviceId !== currentId
      ? { deviceId: { exact: next.deviceId } }
      : { facingMode: this._facing };
    const fresh = await navigator.mediaDevices.getUserMedia({ video: constraints });
    const track = fresh.getVideoTracks()[0];
    if (this.publisher) {
      const sender = this.publisher.getSenders().find((s) => s.track && s.track.kind === "video");
      if (sender) await sender.replaceTrack(track);
    }
    if (this.localStream) {
      if (current) {
        this.localStream.removeTrack(current);
        current.stop();
      }
      this.localStream.addTrack(track);
    }
    this._emit("localStream", { stream: this.localStream });
    return track;
  }

  // ---- receiving ------------------------------------------------------------------

  /** Receives these streams (for `autoSubscribe: false`). */
  subscribe(streamIds) {
    this._send({ type: "subscribe", streamIds });
  }

  unsubscribe(streamIds) {
    this._send({ type: "unsubscribe", streamIds });
  }

  /** Sends a text message to every other member (`sendTextMsg`). */
  sendTextMsg(text) {
    this._send({ type: "textMessage", text });
  }

  /** A live room's stage (PROTOCOL.md `linkMic`): ask the presenter to join it. */
  requestJoinAnchor(reason = "") {
    this._send({ type: "linkMic", action: "request", reason });
  }

  /** The presenter answers a member's request: accepted, it may register its push. */
  responseJoinAnchor(userID, accept, reason = "") {
    this._send({ type: "linkMic", action: accept ? "accept" : "reject", userID, reason });
  }

  /** The presenter takes a member off the stage: its push leaves the room. */
  kickoutJoinAnchor(userID) {
    this._send({ type: "linkMic", action: "kick", userID });
  }

  _streamInfo(info) {
    const known = this.streams.get(info.streamId);
    if (known) known.info = info;
    else this.streams.set(info.streamId, { info, stream: null });
    return this.streams.get(info.streamId);
  }

  _removeStream(id) {
    const s = this.streams.get(id);
    if (!s) return;
    this.streams.delete(id);
    this._emit("streamRemoved", { streamId: id, userID: s.info && s.info.userID });
  }

  _onTrack(e) {
    const stream = e.streams[0];
    if (!stream) return;
    // Statistics name a remote track by its own id: Chrome takes the msid's track id
    // (`<streamId>-video`), Firefox draws one. The stream id (from `a=msid`) is what
    // both agree on, so remember which stream each track carries now.
    this._trackStreams = this._trackStreams || new Map();
    this._trackStreams.set(e.track.id, stream.id);
    const entry = this._streamInfo(
      (this.streams.get(stream.id) || {}).info || { streamId: stream.id },
    );
    const fresh = entry.stream !== stream;
    entry.stream = stream;
    if (fresh) this._emit("remoteStream", { streamId: stream.id, stream, info: entry.info });
  }

  async _onSubscriberOffer(sdp) {
    const pc = this._peer("subscriber");
    await pc.setRemoteDescription({ type: "offer", sdp });
    await this._flushCandidates("subscriber");
    await pc.setLocalDescription(await pc.createAnswer());
    // The server is ICE-lite: it needs no candidates from us, checks come from us.
    this._send({ type: "answer", target: "subscriber", sdp: pc.localDescription.sdp });
  }

  // ---- statistics -----------------------------------------------------------------

  /**
   * Per-stream statistics: for each remote stream and for the local one, what
   * `getStats` says about its video and audio (resolution, frames per second,
   * bitrate, packets lost, round-trip time, jitter-buffer delay).
   * @returns {Promise<Map<string, import("./weir.d.ts").StreamStats>>}
   */
  async getStats() {
    const out = new Map();
    const now = performance.now();
    this._last = this._last || new Map();
    const rate = (key, bytes) => {
      const prev = this._last.get(key);
      this._last.set(key, { bytes, at: now });
      if (!prev || now <= prev.at) return null;
      return ((bytes - prev.bytes) * 8 * 1000) / (now - prev.at);
    };
    const entry = (id) => {
      if (!out.has(id)) out.set(id, { streamId: id, video: {}, audio: {}, rttMs: null });
      return out.get(id);
    };
    const rttOf = (report) => {
      let rtt = null;
      report.forEach((s) => {
        if (s.type === "candidate-pair" && s.nominated && s.currentRoundTripTime !== undefined) {
          rtt = s.currentRoundTripTime * 1000;
        }
      });
      return rtt;
    };
    if (this.subscriber) {
      const report = await this.subscriber.getStats();
      const rtt = rttOf(report);
      report.forEach((s) => {
        if (s.type !== "inbound-rtp" || !s.trackIdentifier) return;
        const id =
          (this._trackStreams && this._trackStreams.get(s.trackIdentifier)) ||
          s.trackIdentifier.replace(/-(audio|video)$/, "");
        const e = entry(id);
        e.rttMs = rtt;
        const k = s.kind === "video" ? e.video : e.audio;
        k.codec = (report.get(s.codecId) || {}).mimeType;
        k.bitrate = rate(`in-${s.id}`, s.bytesReceived || 0);
        k.packetsReceived = s.packetsReceived;
        k.packetsLost = s.packetsLost;
        k.jitterMs = s.jitter !== undefined ? s.jitter * 1000 : null;
        k.jitterBufferMs = s.jitterBufferEmittedCount
          ? (s.jitterBufferDelay / s.jitterBufferEmittedCount) * 1000
          : null;
        if (s.kind === "video") {
          k.width = s.frameWidth;
          k.height = s.frameHeight;
          k.fps = s.framesPerSecond;
          k.framesDecoded = s.framesDecoded;
          k.freezeCount = s.freezeCount;
        } else {
          k.audioLevel = s.audioLevel;
          k.totalAudioEnergy = s.totalAudioEnergy;
        }
      });
    }
    // What this client sends: its camera stream, and its screen share.
    const local = async (pc, info) => {
      const report = await pc.getStats();
      const e = entry(info.streamId);
      e.local = true;
      e.rttMs = rttOf(report);
      report.forEach((s) => {
        if (s.type !== "outbound-rtp") return;
        const k = s.kind === "video" ? e.video : e.audio;
        k.codec = (report.get(s.codecId) || {}).mimeType;
        k.bitrate = (k.bitrate || 0) + (rate(`out-${s.id}`, s.bytesSent || 0) || 0);
        k.packetsSent = (k.packetsSent || 0) + (s.packetsSent || 0);
        if (s.kind === "video") {
          k.width = Math.max(k.width || 0, s.frameWidth || 0);
          k.height = Math.max(k.height || 0, s.frameHeight || 0);
          k.fps = Math.max(k.fps || 0, s.framesPerSecond || 0);
          k.limitation = s.qualityLimitationReason;
        }
      });
      report.forEach((s) => {
        if (s.type === "remote-inbound-rtp") {
          const k = s.kind === "video" ? e.video : e.audio;
          k.packetsLost = (k.packetsLost || 0) + (s.packetsLost || 0);
          k.fractionLost = s.fractionLost;
        }
      });
    };
    if (this.publisher && this.ownStream) await local(this.publisher, this.ownStream);
    if (this.screen && this.sharing) await local(this.screen, this.sharing.info);
    return out;
  }

  // ---- plumbing -------------------------------------------------------------------

  _peer(target) {
    if (this[target]) return this[target];
    const pc = new RTCPeerConnection({
      iceServers: this.iceServers,
      // "relay": only through the TURN servers the join answer named.
      ...(this.options.iceTransportPolicy ? { iceTransportPolicy: this.options.iceTransportPolicy } : {}),
      bundlePolicy: "max-bundle",
      rtcpMuxPolicy: "require",
    });
    pc.addEventListener("icecandidate", (e) => {
      // Trickled for completeness; the server (ICE-lite) does not need them.
      if (e.candidate) this._send({ type: "candidate", target, candidate: e.candidate.toJSON() });
    });
    pc.addEventListener("connectionstatechange", () => {
      this._emit("connectionState", { target, state: pc.connectionState });
    });
    // A network blip or change: restart ICE on this connection (same session, same
    // streams; nobody in the room sees us leave). Only if that does not reconnect
    // within ICE_RESTART_MS do we rejoin with fresh connections.
    pc.addEventListener("iceconnectionstatechange", () => {
      if (this._leaving || this[target] !== pc) return;
      const s = pc.iceConnectionState;
      if (s === "connected" || s === "completed") {
        clearTimeout(this._iceTimers[target]);
        this._iceTimers[target] = null;
        if (this._iceRestarting[target]) {
          this._iceRestarting[target] = false;
          this._emit("reconnected", { target, iceRestart: true });
        }
      } else if ((s === "disconnected" || s === "failed") && !this._iceTimers[target]) {
        // "disconnected" may heal by itself: give it a moment before restarting.
        this._iceTimers[target] = setTimeout(() => this._restartIce(target, pc), s === "failed" ? 0 : 1500);
      }
    });
    if (target === "subscriber") pc.addEventListener("track", (e) => this._onTrack(e));
    this[target] = pc;
    return pc;
  }

  async _setActiveLayers(active, streamId) {
    // The screen share's layers, or the camera's.
    const screen = this.sharing && streamId === this.sharing.info.streamId;
    const pc = screen ? this.screen : this.publisher;
    if (!pc) return;
    for (const sender of pc.getSenders()) {
      if (!sender.track || sender.track.kind !== "video") continue;
      const params = sender.getParameters();
      if (!params.encodings || params.encodings.length < 2) continue;
      let changed = false;
      for (const e of params.encodings) {
        const want = !e.rid || active.includes(e.rid);
        if (e.active !== want) {
          e.active = want;
          changed = true;
        }
      }
      if (changed) {
        try {
          await sender.setParameters(params);
          this._emit("publishLayers", { active });
        } catch (e) {
          this._emit("error", e);
        }
      }
    }
  }

  async _restartIce(target, pc) {
    if (this._leaving || this[target] !== pc || !this.ws) return;
    if (pc.iceConnectionState === "connected" || pc.iceConnectionState === "completed") {
      this._iceTimers[target] = null;
      return;
    }
    this._iceRestarting[target] = true;
    this._emit("reconnecting", { target, iceRestart: true });
    // If the restart does not bring the path back, rejoin.
    this._iceTimers[target] = setTimeout(() => {
      if (this[target] === pc && this._iceRestarting[target]) {
        this._emit("error", new WeirError(0, `${target} connection lost; rejoining`, null));
        if (this.ws) this.ws.close();
      }
    }, ICE_RESTART_MS);
    try {
      if (target === "publisher" || target === "screen") {
        await pc.setLocalDescription(await pc.createOffer({ iceRestart: true }));
        await gathered(pc, ICE_GATHER_MS);
        const answer = await this._request(
          { type: "offer", target, sdp: pc.localDescription.sdp },
          (m) => m.type === "answer" && m.target === target,
        );
        await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
      } else {
        // The server restarts its side and sends a new offer, answered as usual.
        this._send({ type: "restartIce" });
      }
    } catch (e) {
      this._emit("error", e);
    }
  }

  async _flushCandidates(target) {
    const pc = this[target];
    const queued = this._pendingCandidates[target];
    this._pendingCandidates[target] = [];
    for (const c of queued) {
      try {
        await pc.addIceCandidate(c);
      } catch (_) {
        /* a stale candidate is not an error worth reporting */
      }
    }
  }

  _open() {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(this.url);
      this.ws = ws;
      ws.onopen = () => resolve();
      ws.onerror = () => reject(new WeirError(0, `cannot reach ${this.url}`, "join"));
      ws.onmessage = (e) => this._onMessage(e.data);
      ws.onclose = () => this._onClose();
    });
  }

  _send(msg) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(msg));
  }

  _request(msg, match, timeout = REQUEST_TIMEOUT_MS) {
    return new Promise((resolve, reject) => {
      const w = { match, resolve, reject, request: msg.type };
      w.timer = setTimeout(() => {
        this._waiters = this._waiters.filter((x) => x !== w);
        reject(new WeirError(0, `no answer to ${msg.type}`, msg.type));
      }, timeout);
      this._waiters.push(w);
      this._send(msg);
    });
  }

  _settle(msg) {
    for (const w of this._waiters) {
      const refused = msg.type === "error" && msg.request === w.request;
      if (refused || w.match(msg)) {
        clearTimeout(w.timer);
        this._waiters = this._waiters.filter((x) => x !== w);
        if (refused) {
          w.reject(new WeirError(msg.code, msg.message, msg.request, msg.tencentCode));
        } else {
          w.resolve(msg);
        }
        return true;
      }
    }
    return false;
  }

  _onMessage(text) {
    let msg;
    try {
      msg = JSON.parse(text);
    } catch (_) {
      return;
    }
    const settled = this._settle(msg);
    switch (msg.type) {
      case "offer":
        if (msg.target === "subscriber") {
          this._subscriberChain = this._subscriberChain
            .then(() => this._onSubscriberOffer(msg.sdp))
            .catch((e) => this._emit("error", e));
        }
        break;
      case "candidate": {
        const pc = this[msg.target];
        if (!msg.candidate) break;
        if (pc && pc.remoteDescription) pc.addIceCandidate(msg.candidate).catch(() => {});
        else this._pendingCandidates[msg.target].push(msg.candidate);
        break;
      }
      case "memberJoined":
        this.members.add(msg.userID);
        this._emit("memberJoined", msg);
        break;
      case "memberLeft":
        this.members.delete(msg.userID);
        this._emit("memberLeft", msg);
        break;
      case "streamAdded":
        this._streamInfo(msg.stream);
        this._emit("streamAdded", msg.stream);
        break;
      case "streamRemoved":
        // Our own screen share, when its connection was lost: share again to resume.
        if (this.sharing && this.sharing.info.streamId === msg.streamId) this._screenEnded();
        else this._removeStream(msg.streamId);
        break;
      case "streamMuted": {
        const s = this.streams.get(msg.streamId);
        if (s && s.info) s.info[msg.kind === "audio" ? "audioMuted" : "videoMuted"] = msg.muted;
        this._emit("streamMuted", msg);
        break;
      }
      case "textMessage":
        this._emit("textMessage", msg);
        break;
      case "linkMic":
        this._emit("linkMic", msg);
        break;
      case "pong":
        this.rttMs = Date.now() - msg.ts;
        break;
      case "left":
        this._leaving = this._leaving || msg.reason !== "serverShutdown";
        this._emit("left", { reason: msg.reason });
        break;
      case "congestion":
        this.congestion = {
          state: msg.state,
          estimate: msg.estimate,
          paused: msg.paused || [],
          lowered: msg.lowered || [],
        };
        this._emit("congestion", this.congestion);
        break;
      case "publishLayers":
        // Simulcast layers nobody needs are switched off at the encoder (and back on
        // when someone may need them).
        this._setActiveLayers(msg.active || [], msg.streamId);
        break;
      case "publishTarget":
        this._emit("publishTarget", {
          streamId: msg.streamId,
          userID: msg.userID,
          bitrate: msg.bitrate,
          policy: msg.policy,
        });
        break;
      case "error":
        if (!settled) this._emit("error", new WeirError(msg.code, msg.message, msg.request, msg.tencentCode));
        break;
      default:
        break;
    }
  }

  async _onClose() {
    if (this._reconnecting) return; // a failed attempt: the loop below goes on
    const wasJoined = this.state === "joined";
    const publishing = this.publishing;
    const sharing = this.sharing;
    this.sharing = null;
    this._teardown();
    if (this._leaving || !wasJoined || !this.options.reconnect) {
      if (this.state !== "left") this.state = "left";
      return;
    }
    // A network blip: join again (the server replaces the old session) with fresh
    // peer connections, and publish the same tracks again.
    this.state = "reconnecting";
    this._emit("reconnecting", {});
    this._reconnecting = true;
    for (const delay of RECONNECT_DELAYS_MS) {
      await new Promise((r) => setTimeout(r, delay));
      if (this._leaving) break;
      try {
        await this.join();
        if (publishing) await this.publish(publishing);
        if (sharing && sharing.stream.getVideoTracks().some((t) => t.readyState === "live")) {
          await this.publishScreen({ stream: sharing.stream, maxBitrate: sharing.maxBitrate });
          this.sharing.captured = sharing.captured;
        }
        this._reconnecting = false;
        this._emit("reconnected", {});
        return;
      } catch (e) {
        if (e instanceof WeirError && e.code >= 400 && e.code !== 429 && e.code !== 503) break;
        if (this.ws) {
          this.ws.onclose = null;
          this.ws.close();
        }
      }
    }
    this._reconnecting = false;
    this._teardown();
    this.state = "left";
    this._emit("left", { reason: "disconnected" });
  }
}
