// Tests of weir-mp.js under Node, against a real Weir server (tests/miniprogram.rs
// starts one and runs this with its addresses and two users' userSigs in the
// environment). `wx` is a stand-in: wx.request goes out with fetch, wx.connectSocket
// over a real websocket (Node's own WebSocket, or the `ws` package where Node has none).
'use strict';

const assert = require('node:assert/strict');
const { RoomService, WeirRoom } = require('./weir-mp.js');

const WS = globalThis.WebSocket || require('ws');

const wx = {
  request(opts) {
    fetch(opts.url, {
      method: opts.method || 'GET',
      headers: opts.header,
      body: opts.method === 'POST' ? JSON.stringify(opts.data || {}) : undefined,
    })
      .then(async (r) => {
        const text = await r.text();
        let data = text;
        try {
          data = JSON.parse(text);
        } catch (e) {}
        opts.success && opts.success({ statusCode: r.status, data });
      })
      .catch((e) => opts.fail && opts.fail({ errMsg: 'request:fail ' + e.message }));
  },
  connectSocket(opts) {
    const ws = new WS(opts.url);
    const task = {
      onOpen: (f) => ws.addEventListener('open', () => f({})),
      onMessage: (f) => ws.addEventListener('message', (e) => f({ data: String(e.data) })),
      onClose: (f) => ws.addEventListener('close', (e) => f({ code: e.code, reason: e.reason })),
      onError: (f) => ws.addEventListener('error', () => f({ errMsg: 'socket error' })),
      send: (o) => ws.send(o.data),
      close: () => ws.close(),
    };
    return task;
  },
};

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set (run through tests/miniprogram.rs)`);
  return v;
};
const server = env('WEIR_HTTP');
const wsURL = env('WEIR_WS');
const app = Number(env('WEIR_APP'));
const sigs = { mp_alice: env('WEIR_SIG_ALICE'), mp_bob: env('WEIR_SIG_BOB') };

/** Resolves with the first event `name` of `room` that `pick` accepts. */
function next(room, name, pick, ms = 5000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ${name} within ${ms} ms`)), ms);
    room.on(name, (e) => {
      if (!pick || pick(e)) {
        clearTimeout(timer);
        resolve(e);
      }
    });
  });
}

let n = 0;
const ok = (what) => console.log(`ok ${++n} - ${what}`);

async function main() {
  // The owner: log in, get a push URL, create a room (as <rtc-room> does).
  const alice = new RoomService(wx, { server, kind: 'multi_room' });
  await alice.login(app, 'mp_alice', sigs.mp_alice);
  assert.match(alice.token, /^[0-9a-f]{32}$/);
  const push = await alice.getPushURL();
  assert.match(push, new RegExp(`^rtmp://.+/live/${app}_mp_alice\\?`));
  const made = await alice.createRoom('customer service');
  assert.match(made.roomID, /^\d+$/);
  assert.ok(made.privateMapKey, 'create_room hands the owner a privateMapKey for signaling');
  ok('login, get_push_url, create_room');

  // A bad token is code 7, as a rejection.
  const forged = new RoomService(wx, { server, kind: 'multi_room' });
  forged.userID = 'mp_alice';
  forged.token = '00';
  await assert.rejects(forged.getPushers(made.roomID), (e) => e.code === 7);
  ok('a bad token is refused with code 7');

  // The owner on the signaling socket.
  const aliceRoom = new WeirRoom(wx, {
    url: wsURL, sdkAppID: app, userID: 'mp_alice', userSig: sigs.mp_alice,
    roomID: Number(made.roomID), privateMapKey: made.privateMapKey,
  });
  const joined = await aliceRoom.join();
  assert.equal(joined.userID, 'mp_alice');
  assert.equal(joined.room, made.roomID);
  ok('wx.connectSocket joins the room');

  // A second mini program enters: registers as a pusher, gets its privateMapKey.
  const bob = new RoomService(wx, { server, kind: 'multi_room' });
  await bob.login(app, 'mp_bob', sigs.mp_bob);
  const added = await bob.addPusher(made.roomID, await bob.getPushURL(), 'Bob', '', 500);
  assert.ok(added.privateMapKey);
  const bobRoom = new WeirRoom(wx, {
    url: wsURL, sdkAppID: app, userID: 'mp_bob', userSig: sigs.mp_bob,
    roomID: Number(made.roomID), privateMapKey: added.privateMapKey,
  });
  const seen = next(aliceRoom, 'memberJoined', (e) => e.userID === 'mp_bob');
  const bobJoined = await bobRoom.join();
  assert.ok(bobJoined.members.some((m) => m.userID === 'mp_alice'), 'bob sees alice in the room');
  await seen;
  ok('room events: memberJoined');

  // Room text both ways (sendRoomTextMsg of the components).
  const heard = next(bobRoom, 'textMessage', (e) => e.userID === 'mp_alice');
  aliceRoom.sendText('你好, bob');
  assert.equal((await heard).text, '你好, bob');
  const back = next(aliceRoom, 'textMessage', (e) => e.userID === 'mp_bob');
  bobRoom.sendText('hi alice');
  assert.equal((await back).text, 'hi alice');
  ok('text messages both ways');

  // Heartbeats keep bob a pusher (every 0.5 s here); get_pushers lists him.
  await new Promise((r) => setTimeout(r, 1200));
  const pushers = await alice.getPushers(made.roomID);
  assert.ok(pushers.pushers.some((p) => p.userID === 'mp_bob' && p.userName === 'Bob'), JSON.stringify(pushers));
  ok('get_pushers lists the pusher');

  // The owner removes bob: bob's session ends (left, reason removed, close 4005) and
  // alice is told.
  const gone = next(aliceRoom, 'memberLeft', (e) => e.userID === 'mp_bob');
  const bobLeft = next(bobRoom, 'left');
  await alice.deletePusher(made.roomID, 'mp_bob');
  assert.equal((await gone).reason, 'removed');
  const l = await bobLeft;
  assert.equal(l.reason, 'removed');
  assert.equal(l.code, 4005);
  bob.stopHeartbeat();
  ok('the owner removes a pusher: removed for everyone');

  // A live room's stage (linkMic): bob, in the audience, asks; alice, the presenter,
  // accepts; bob registers his push; alice takes him off, and his socket stays.
  const aliceLive = new RoomService(wx, { server, kind: 'live_room' });
  await aliceLive.login(app, 'mp_alice', sigs.mp_alice);
  const live = await aliceLive.createRoom('class');
  const aliceStage = new WeirRoom(wx, {
    url: wsURL, sdkAppID: app, userID: 'mp_alice', userSig: sigs.mp_alice,
    roomID: Number(live.roomID), privateMapKey: live.privateMapKey,
  });
  await aliceStage.join();
  const bobLive = new RoomService(wx, { server, kind: 'live_room' });
  await bobLive.login(app, 'mp_bob', sigs.mp_bob);
  const seat = await bobLive.call('add_audience', { roomID: live.roomID, userID: 'mp_bob', userInfo: '{}' });
  const bobStage = new WeirRoom(wx, {
    url: wsURL, sdkAppID: app, userID: 'mp_bob', userSig: sigs.mp_bob,
    roomID: Number(live.roomID), privateMapKey: seat.privateMapKey,
  });
  await bobStage.join();
  const bobPush = await bobLive.getPushURL();
  await assert.rejects(bobLive.addPusher(live.roomID, bobPush, 'Bob'), (e) => e.code === 7);
  const asked = next(aliceStage, 'linkMic', (e) => e.action === 'request');
  bobStage.requestJoinAnchor('may I?');
  const request = await asked;
  assert.equal(request.userID, 'mp_bob');
  assert.equal(request.reason, 'may I?');
  const answered = next(bobStage, 'linkMic', (e) => e.action === 'accept');
  aliceStage.responseJoinAnchor('mp_bob', true);
  assert.equal((await answered).userID, 'mp_alice');
  await bobLive.addPusher(live.roomID, bobPush, 'Bob', '', 500);
  const kicked = next(bobStage, 'linkMic', (e) => e.action === 'kick');
  aliceStage.kickoutJoinAnchor('mp_bob');
  await kicked;
  bobLive.stopHeartbeat();
  const after = await aliceLive.getPushers(live.roomID);
  assert.ok(!after.pushers.some((p) => p.userID === 'mp_bob'), JSON.stringify(after));
  const refused = next(bobStage, 'error', (e) => e.request === 'linkMic');
  bobStage.kickoutJoinAnchor('mp_alice');
  assert.equal((await refused).code, 403, 'only the presenter kicks');
  ok('linkMic: request, accept, add_pusher, kick; only the presenter decides');
  bobStage.leave();
  aliceStage.leave();

  // Leaving.
  const closed = next(aliceRoom, 'close');
  aliceRoom.leave();
  await closed;
  const token = alice.token;
  await alice.logout();
  alice.token = token; // the old token, as a client that kept it
  await assert.rejects(alice.getPushers(made.roomID), (e) => e.code === 7);
  ok('leave and logout');
  console.log(`1..${n}`);
}

main().then(
  () => process.exit(0),
  (e) => {
    console.error('not ok -', e && e.stack ? e.stack : JSON.stringify(e));
    process.exit(1);
  },
);
