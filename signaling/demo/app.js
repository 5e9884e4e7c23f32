// The demo page: joins a room with the Weir SDK, shows every stream with its
// statistics, a chat, the room list and the URLs a mini program would use.
import { WeirRoom } from "/sdk/weir.js";

const $ = (id) => document.getElementById(id);
const state = {
  room: null,
  dev: false,
  creds: null,
  tiles: new Map(),
  statsTimer: null,
  // This tab's downlink as the server sees it, and the room's target for our stream.
  congestion: null,
  target: null,
};
window.weirDemo = state; // for tests and the curious: the live WeirRoom is state.room

function setStatus(text, kind) {
  const s = $("status");
  s.textContent = text;
  s.className = `status ${kind || ""}`;
}

function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  Object.assign(e, props);
  for (const c of children) e.append(c);
  return e;
}

async function devCredentials(userID, roomID) {
  const q = new URLSearchParams({ userID, roomID });
  const r = await fetch(`/dev/credentials?${q}`);
  if (!r.ok) throw new Error(await r.text());
  return r.json();
}

async function loadRooms() {
  if (!state.dev) return;
  const r = await fetch("/dev/rooms");
  if (!r.ok) return;
  const rooms = await r.json();
  for (const listId of ["rooms", "rooms-side"]) {
    const list = $(listId);
    list.replaceChildren();
    if (rooms.length === 0) list.append(el("li", { className: "muted", textContent: "none yet" }));
    for (const room of rooms) {
      const link = el("a", { textContent: `Room ${room.room}` });
      link.onclick = () => {
        $("room").value = room.room;
        if (!state.room) $("user").focus();
      };
      const who = room.members.length === 1 ? "1 member" : `${room.members.length} members`;
      list.append(el("li", {}, link, el("span", { className: "muted",
        textContent: `${who}, ${room.streams.length} streaming` })));
    }
  }
}

function tile(id, label, local) {
  let t = state.tiles.get(id);
  if (t) return t;
  const video = el("video", { autoplay: true, playsInline: true, muted: !!local });
  const name = el("div", { className: "name", textContent: label });
  const stats = el("div", { className: "stats", textContent: "waiting for media…" });
  const root = el("div", { className: `tile${local ? " local" : ""}` }, video, name, stats);
  root.dataset.stream = id;
  $("tiles").append(root);
  t = { root, video, name, stats, label };
  state.tiles.set(id, t);
  return t;
}

function dropTile(id) {
  const t = state.tiles.get(id);
  if (!t) return;
  t.root.remove();
  state.tiles.delete(id);
}

function chatLine(who, text, system) {
  const li = system
    ? el("li", { className: "sys", textContent: text })
    : el("li", {}, el("span", { className: "who", textContent: who }), text);
  $("chat").append(li);
  $("chat").scrollTop = $("chat").scrollHeight;
}

function playUrls() {
  const list = $("play-urls");
  list.replaceChildren();
  const query = state.creds ? state.creds.playQuery : null;
  const streams = [...state.room.streams.values()].map((s) => s.info).filter(Boolean);
  if (state.room.ownStream) streams.unshift(state.room.ownStream);
  if (streams.length === 0) list.append(el("li", { className: "muted", textContent: "no stream yet" }));
  for (const s of streams) {
    if (!s.urls) continue;
    const sign = (u) => (query ? `${u}?${query}` : u);
    list.append(el("li", {},
      el("div", { className: "label", textContent: `${s.userID} (${s.source})` }),
      el("code", { textContent: sign(s.urls.rtmp) }),
      el("code", { textContent: sign(s.urls.flv) })));
  }
}

const fmt = {
  kbps: (b) => (b == null ? "–" : `${Math.round(b / 1000)} kbit/s`),
  ms: (v) => (v == null ? "–" : `${Math.round(v)} ms`),
};

async function refreshStats() {
  if (!state.room) return;
  const all = await state.room.getStats();
  for (const [id, s] of all) {
    const t = state.tiles.get(s.local ? "local" : id);
    if (!t) continue;
    const v = s.video;
    const a = s.audio;
    // packetsLost can go negative (duplicates, retransmissions): never show that.
    const lost = Math.max(0, (v.packetsLost || 0) + (a.packetsLost || 0));
    const recv = (v.packetsReceived || 0) + (a.packetsReceived || 0);
    const loss = recv ? `${((100 * lost) / (recv + lost)).toFixed(1)} %` : "–";
    const parts = [
      v.width ? `${v.width}×${v.height}` : "no video",
      v.fps != null ? `${Math.round(v.fps)} fps` : null,
      fmt.kbps((v.bitrate || 0) + (a.bitrate || 0)),
      s.local ? null : `loss ${loss}`,
      `rtt ${fmt.ms(s.rttMs)}`,
      s.local ? null : `buffer ${fmt.ms(v.jitterBufferMs)}`,
      v.codec ? v.codec.replace("video/", "") : null,
      !s.local && state.congestion && state.congestion.paused.includes(id)
        ? "video paused: your network cannot carry it"
        : null,
      !s.local && state.congestion && state.congestion.lowered.includes(id) ? "lower layer (network)" : null,
      s.local && state.target ? `room asks ${fmt.kbps(state.target.bitrate)} (${state.target.policy})` : null,
    ].filter(Boolean);
    t.stats.textContent = parts.join(" · ");
    t.root.dataset.framesDecoded = v.framesDecoded || 0;
    t.root.dataset.audioLevel = a.audioLevel || 0;
  }
}

async function join(ev) {
  ev.preventDefault();
  $("join-error").textContent = "";
  const userID = $("user").value.trim();
  const roomText = $("room").value.trim();
  let creds;
  try {
    if (state.dev) {
      creds = await devCredentials(userID, roomText);
    } else {
      creds = { sdkAppID: Number($("sdkappid").value), userID, userSig: $("usersig").value.trim(),
        privateMapKey: $("pmk").value.trim() };
      if (/^\d+$/.test(roomText)) creds.roomID = Number(roomText);
      else creds.strRoomID = roomText;
    }
  } catch (e) {
    $("join-error").textContent = `Could not get credentials: ${e.message}`;
    return;
  }
  state.creds = creds;
  const room = new WeirRoom(creds);
  state.room = room;
  state.joinClickedAt = performance.now();
  room.on("remoteStream", ({ streamId, stream, info }) => {
    const t = tile(streamId, info && info.userID ? label(info) : streamId);
    t.video.srcObject = stream;
    t.video.play().catch(() => {});
    if ("requestVideoFrameCallback" in t.video && state.firstFrameMs === undefined) {
      t.video.requestVideoFrameCallback(() => {
        if (state.firstFrameMs === undefined) {
          state.firstFrameMs = performance.now() - state.joinClickedAt;
          console.log(`first remote frame ${state.firstFrameMs.toFixed(0)} ms after join`);
        }
      });
    }
    playUrls();
  });
  room.on("streamAdded", (info) => {
    const t = state.tiles.get(info.streamId);
    if (t) {
      t.label = label(info);
      t.name.textContent = t.label;
    }
    playUrls();
  });
  room.on("streamRemoved", ({ streamId }) => {
    dropTile(streamId);
    playUrls();
  });
  room.on("streamMuted", ({ streamId, kind, muted }) => {
    const t = state.tiles.get(streamId);
    if (t) t.name.textContent = `${t.label}${muted ? ` (${kind} muted)` : ""}`;
  });
  room.on("memberJoined", ({ userID: who }) => chatLine(null, `${who} joined`, true));
  room.on("memberLeft", ({ userID: who }) => chatLine(null, `${who} left`, true));
  room.on("textMessage", ({ userID: who, text }) => chatLine(who, text));
  room.on("error", (e) => setStatus(`error: ${e.message}`, "bad"));
  room.on("reconnecting", () => setStatus("reconnecting…", "bad"));
  room.on("reconnected", () => setStatus(`in room ${roomText}`, "ok"));
  room.on("congestion", (c) => {
    state.congestion = c;
    // In the normal state the server's figure is bounded by what it has sent you.
    const est = c.estimate ? ` · estimate ${fmt.kbps(c.estimate)}` : "";
    const paused = c.paused.length ? ` · ${c.paused.length} video(s) paused` : "";
    setStatus(`network: ${c.state}${est}${paused}`, c.state === "normal" ? "ok" : "bad");
  });
  room.on("publishTarget", (t) => {
    if (state.room && state.room.ownStream && t.streamId === state.room.ownStream.streamId) state.target = t;
  });
  room.on("left", ({ reason }) => {
    if (reason !== "left") setStatus(`left the room (${reason})`, "bad");
  });
  room.on("screenShared", () => {
    const t = tile("local-screen", `${userID} (your screen)`, true);
    t.video.srcObject = room.sharing.stream;
    $("share-screen").textContent = "Stop sharing";
  });
  room.on("screenEnded", () => {
    dropTile("local-screen");
    $("share-screen").textContent = "Share screen";
  });
  room.on("localStream", ({ stream }) => {
    const t = tile("local", `${userID} (you)`, true);
    t.video.srcObject = stream;
  });
  try {
    setStatus("joining…");
    await room.join();
    $("join-panel").hidden = true;
    $("room-panel").hidden = false;
    $("room-title").textContent = `Room ${roomText}`;
    setStatus(`in room ${roomText}`, "ok");
    const audio = $("send-audio").checked;
    const video = $("send-video").checked;
    const videoCodec = $("video-codec").value;
    if (audio || video) await room.publish({ audio, video, videoCodec });
  } catch (e) {
    $("join-error").textContent = e.message;
    $("join-panel").hidden = false;
    $("room-panel").hidden = true;
    setStatus("not connected", "bad");
    await room.leave();
    state.room = null;
    return;
  }
  playUrls();
  if (state.dev) {
    try {
      const pusher = await devCredentials(`mp-${userID}`.slice(0, 32), roomText);
      $("push-url").textContent = pusher.pushUrl;
    } catch (_) { /* shown as – */ }
  } else {
    $("push-url").textContent = "ask your backend for a signed push URL";
  }
  state.statsTimer = setInterval(refreshStats, 1000);
}

async function leave() {
  clearInterval(state.statsTimer);
  if (state.room) await state.room.leave();
  state.room = null;
  for (const id of [...state.tiles.keys()]) dropTile(id);
  $("chat").replaceChildren();
  $("room-panel").hidden = true;
  $("join-panel").hidden = false;
  setStatus("not connected");
  loadRooms();
}

function label(info) {
  return `${info.userID}${info.screen ? " · screen" : ""}${info.source === "rtmp" ? " · RTMP" : ""}`;
}

/** Shares a screen beside the camera, or stops sharing it. */
async function shareScreen() {
  const room = state.room;
  if (!room) return;
  try {
    if (room.sharing) await room.unpublishScreen();
    else await room.publishScreen({ maxBitrate: 1500000 });
  } catch (e) {
    setStatus(e.message, "bad");
  }
}

function toggle(button, kind) {
  const on = !button.classList.contains("on");
  button.classList.toggle("on", on);
  if (kind === "audio") {
    state.room.muteAudio(on);
    button.textContent = on ? "Unmute" : "Mute";
  } else {
    state.room.muteVideo(on);
    button.textContent = on ? "Start video" : "Stop video";
  }
}

async function main() {
  $("user").value = `guest-${Math.random().toString(36).slice(2, 6)}`;
  const params = new URLSearchParams(location.search);
  if (params.get("room")) $("room").value = params.get("room");
  if (params.get("user")) $("user").value = params.get("user");
  const probe = await fetch("/dev/rooms").catch(() => null);
  state.dev = !!(probe && probe.ok);
  $("manual").hidden = state.dev;
  $("rooms-box").hidden = !state.dev;
  $("side-rooms").hidden = !state.dev;
  if (state.dev) {
    loadRooms();
    setInterval(loadRooms, 3000);
  }
  $("join-form").addEventListener("submit", join);
  $("leave").onclick = leave;
  $("mute-audio").onclick = (e) => toggle(e.currentTarget, "audio");
  $("mute-video").onclick = (e) => toggle(e.currentTarget, "video");
  $("switch-camera").onclick = () => state.room && state.room.switchCamera().catch((e) => setStatus(e.message, "bad"));
  $("share-screen").onclick = shareScreen;
  $("chat-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("chat-input").value.trim();
    if (!text || !state.room) return;
    state.room.sendTextMsg(text);
    chatLine(`${state.room.options.userID} (you)`, text);
    $("chat-input").value = "";
  });
  if (params.get("autojoin") !== null) $("join").click();
}

main();
