/**
 * weir-mp.js: Weir for WeChat mini programs. Plain JavaScript (CommonJS, ES5-safe
 * syntax apart from `const`/`let`), no build step: copy it into the mini program and
 * `require('./weir-mp.js')`.
 *
 * Two parts, each in PROTOCOL.md's and MINIPROGRAM.md's terms:
 *
 * - `RoomService`: the room-service calls the room components make (`/weapp/...`,
 *   over `wx.request`): login with a userSig, push URL, create/enter a room, register
 *   as a pusher, heartbeats, pusher lists. It replaces the backend URL of Tencent's
 *   demo components.
 * - `WeirRoom`: the signaling socket (`wx.connectSocket`): the room's events (members
 *   joining and leaving, streams added and removed: what the components learnt from
 *   IM's `notifyPusherChange`) and room text messages (what they sent with
 *   `sendRoomTextMsg`). It joins with `autoSubscribe: false`: a mini program plays
 *   streams with `<live-player>` from the play URLs the events carry, not over WebRTC.
 *
 * Both take the `wx` object, so the same code runs under Node with a stand-in
 * (see test.js).
 */

'use strict';

const PROTOCOL = 1;

function encodeQuery(params) {
  const parts = [];
  for (const k in params) {
    if (params[k] !== undefined && params[k] !== null) {
      parts.push(encodeURIComponent(k) + '=' + encodeURIComponent(String(params[k])));
    }
  }
  return parts.join('&');
}

/**
 * The room service of one kind of room.
 * @param {object} wx      the mini program's `wx` (or a stand-in)
 * @param {object} options {server: 'https://host:8080', kind: 'multi_room' | 'double_room' | 'live_room'}
 */
function RoomService(wx, options) {
  this.wx = wx;
  this.base = options.server.replace(/\/$/, '') + '/weapp/' + (options.kind || 'multi_room') + '/';
  this.userID = '';
  this.token = '';
  this._heartbeat = null;
}

/** One call: `{code, message, ...}` on success (code 0); rejects with that object otherwise. */
RoomService.prototype.call = function (action, body, query) {
  const self = this;
  const q = Object.assign({}, query || {}, { userID: self.userID });
  if (self.token) q.token = self.token;
  return new Promise(function (resolve, reject) {
    self.wx.request({
      url: self.base + action + '?' + encodeQuery(q),
      method: 'POST',
      data: body || {},
      header: { 'content-type': 'application/json' },
      success: function (res) {
        const d = res.data || {};
        if (d.code === 0) resolve(d);
        else reject(d.code === undefined ? { code: -1, message: 'HTTP ' + res.statusCode } : d);
      },
      fail: function (err) {
        reject({ code: -1, message: (err && err.errMsg) || 'request failed' });
      },
    });
  });
};

/** Logs in with a userSig (verified by Weir); later calls carry the token it returns. */
RoomService.prototype.login = function (sdkAppID, userID, userSig) {
  const self = this;
  self.userID = userID;
  self.token = '';
  return self.call('login', {}, { sdkAppID: sdkAppID, userSig: userSig, accountType: 0 }).then(function (r) {
    self.token = r.token;
    self.userID = r.userID;
    return r;
  });
};

RoomService.prototype.getPushURL = function () {
  return this.call('get_push_url', { userID: this.userID }).then(function (r) { return r.pushURL; });
};

RoomService.prototype.createRoom = function (roomInfo, roomID) {
  const body = { userID: this.userID, roomInfo: roomInfo || '' };
  if (roomID) body.roomID = String(roomID);
  return this.call('create_room', body);
};

/**
 * Registers this user's push (after `<live-pusher>` reported it started) in a room:
 * its RTMP stream joins the room for browsers. Heartbeats start (every `everyMs`,
 * 7 s as the components send them; Weir drops a pusher 20 s after its last one).
 */
RoomService.prototype.addPusher = function (roomID, pushURL, userName, userAvatar, everyMs) {
  const self = this;
  return self
    .call('add_pusher', {
      roomID: String(roomID),
      userID: self.userID,
      userName: userName || self.userID,
      userAvatar: userAvatar || '',
      pushURL: pushURL,
    })
    .then(function (r) {
      self.stopHeartbeat();
      self._heartbeat = setInterval(function () {
        self.call('pusher_heartbeat', { roomID: String(roomID), userID: self.userID }).catch(function () {});
      }, everyMs || 7000);
      return r;
    });
};

RoomService.prototype.stopHeartbeat = function () {
  if (this._heartbeat) clearInterval(this._heartbeat);
  this._heartbeat = null;
};

/** The room's pushers (mini programs and browsers), each with its `accelerateURL`. */
RoomService.prototype.getPushers = function (roomID) {
  return this.call('get_pushers', { roomID: String(roomID) });
};

/** Leaves the stage (or, for the room's owner, removes `userID` from it). */
RoomService.prototype.deletePusher = function (roomID, userID) {
  if (!userID || userID === this.userID) this.stopHeartbeat();
  return this.call('delete_pusher', { roomID: String(roomID), userID: userID || this.userID });
};

RoomService.prototype.logout = function () {
  this.stopHeartbeat();
  const self = this;
  return self.call('logout', {}).then(function (r) {
    self.token = '';
    return r;
  });
};

/**
 * A member of a Weir room on the signaling socket.
 * @param {object} wx      the mini program's `wx` (or a stand-in)
 * @param {object} options {url: 'wss://host/ws', sdkAppID, userID, userSig, roomID | strRoomID, privateMapKey}
 *
 * Events (`on(name, fn)`): `joined` (the `joined` message), `memberJoined`,
 * `memberLeft`, `streamAdded` (its `stream.playURLs` carry this member's credentials,
 * ready for `<live-player>`), `streamRemoved`, `textMessage`, `linkMic` (the live
 * room's stage: `{action: 'request' | 'accept' | 'reject' | 'kick', userID, reason}`),
 * `error`, `left` ({reason, code}: the room ended this member's session), `close`.
 */
function WeirRoom(wx, options) {
  this.wx = wx;
  this.options = options;
  this.handlers = {};
  this.task = null;
  this._ping = null;
  this.members = {};
}

WeirRoom.prototype.on = function (name, fn) {
  (this.handlers[name] = this.handlers[name] || []).push(fn);
  return this;
};

WeirRoom.prototype._emit = function (name, value) {
  (this.handlers[name] || []).forEach(function (fn) {
    try {
      fn(value);
    } catch (e) {
      console.error('weir-mp: a ' + name + ' handler threw', e);
    }
  });
};

/** The room credentials a player adds to a play URL (receive privileges needed). */
WeirRoom.prototype.playQuery = function () {
  const o = this.options;
  const q = { sdkappid: o.sdkAppID, userid: o.userID, usersig: o.userSig, privatemapkey: o.privateMapKey };
  if (o.roomID !== undefined && o.roomID !== null) q.roomid = o.roomID;
  else q.strroomid = o.strRoomID;
  return encodeQuery(q);
};

WeirRoom.prototype._withPlayURLs = function (stream) {
  if (stream && stream.urls) {
    const q = this.playQuery();
    stream.playURLs = { rtmp: stream.urls.rtmp + '?' + q, flv: stream.urls.flv + '?' + q };
  }
  return stream;
};

/** Opens the socket and joins; resolves with the `joined` message. */
WeirRoom.prototype.join = function () {
  const self = this;
  const o = self.options;
  return new Promise(function (resolve, reject) {
    let settled = false;
    const task = self.wx.connectSocket({ url: o.url });
    self.task = task;
    task.onOpen(function () {
      const join = {
        type: 'join',
        protocol: PROTOCOL,
        sdkAppID: Number(o.sdkAppID),
        userID: o.userID,
        userSig: o.userSig,
        privateMapKey: o.privateMapKey,
        autoSubscribe: false,
      };
      if (o.roomID !== undefined && o.roomID !== null) join.roomID = Number(o.roomID);
      else join.strRoomID = String(o.strRoomID);
      task.send({ data: JSON.stringify(join) });
      self._ping = setInterval(function () {
        task.send({ data: JSON.stringify({ type: 'ping', ts: Date.now() }) });
      }, 10000);
    });
    task.onMessage(function (res) {
      let m;
      try {
        m = JSON.parse(res.data);
      } catch (e) {
        return;
      }
      switch (m.type) {
        case 'joined':
          (m.members || []).forEach(function (mem) {
            self.members[mem.userID] = mem;
            (mem.streams || []).forEach(function (s) { self._withPlayURLs(s); });
          });
          settled = true;
          resolve(m);
          self._emit('joined', m);
          break;
        case 'memberJoined':
          self.members[m.userID] = { userID: m.userID, streams: [] };
          self._emit('memberJoined', m);
          break;
        case 'memberLeft':
          delete self.members[m.userID];
          self._emit('memberLeft', m);
          break;
        case 'streamAdded':
          self._withPlayURLs(m.stream);
          self._emit('streamAdded', m);
          break;
        case 'streamRemoved':
          self._emit('streamRemoved', m);
          break;
        case 'textMessage':
          self._emit('textMessage', m);
          break;
        case 'linkMic':
          self._emit('linkMic', m);
          break;
        case 'left':
          self._left = m.reason;
          break;
        case 'error':
          if (!settled && m.request === 'join') {
            settled = true;
            reject(m);
          }
          self._emit('error', m);
          break;
        default:
          break;
      }
    });
    task.onError(function (e) {
      if (!settled) {
        settled = true;
        reject({ code: -1, message: (e && e.errMsg) || 'socket error' });
      }
    });
    task.onClose(function (res) {
      if (self._ping) clearInterval(self._ping);
      self._ping = null;
      if (!settled) {
        settled = true;
        reject({ code: res && res.code, message: (res && res.reason) || 'closed before joining' });
      }
      if (self._left) self._emit('left', { reason: self._left, code: res && res.code });
      self._emit('close', res || {});
    });
  });
};

/** A room text message (5 a second at most). */
WeirRoom.prototype.sendText = function (text) {
  if (this.task) this.task.send({ data: JSON.stringify({ type: 'textMessage', text: String(text) }) });
};

WeirRoom.prototype._linkMic = function (action, userID, reason) {
  const m = { type: 'linkMic', action: action };
  if (userID) m.userID = String(userID);
  if (reason) m.reason = String(reason);
  if (this.task) this.task.send({ data: JSON.stringify(m) });
};

/**
 * The live room's stage (what `<live-room>` did over IM C2C messages). An audience
 * member asks the presenter (the room's creator) to join it; the presenter gets a
 * `linkMic` event `{action: 'request', userID, reason}`.
 */
WeirRoom.prototype.requestJoinAnchor = function (reason) {
  this._linkMic('request', null, reason);
};

/**
 * The presenter answers a request. Accepted, the member gets `{action: 'accept'}` and
 * may register its push (`RoomService.addPusher`, within 60 s); Weir refuses
 * `add_pusher` in a live room to anyone the presenter has not accepted.
 */
WeirRoom.prototype.responseJoinAnchor = function (userID, accept, reason) {
  this._linkMic(accept ? 'accept' : 'reject', userID, reason);
};

/** The presenter takes a member off the stage: its push leaves the room, its socket stays. */
WeirRoom.prototype.kickoutJoinAnchor = function (userID) {
  this._linkMic('kick', userID);
};

WeirRoom.prototype.leave = function () {
  if (this.task) this.task.send({ data: JSON.stringify({ type: 'leave' }) });
};

module.exports = { RoomService: RoomService, WeirRoom: WeirRoom, PROTOCOL: PROTOCOL };
