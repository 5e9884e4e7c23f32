// Types of the Weir browser SDK (weir.js). Protocol: PROTOCOL.md.

export const PROTOCOL: 1;

export interface WeirOptions {
  /** Websocket URL; default `ws(s)://<page host>/ws`. */
  url?: string;
  sdkAppID: number;
  userID: string;
  userSig: string;
  privateMapKey: string;
  /** Exactly one of roomID (1..4294967295) and strRoomID (1–64 bytes). */
  roomID?: number;
  strRoomID?: string;
  /** Receive every stream of the room without asking (default true). */
  autoSubscribe?: boolean;
  /** Rejoin after a network blip (default true). */
  reconnect?: boolean;
  /** The room's congestion policy, taken if this join creates the room. */
  congestionPolicy?: "weakest" | "majority";
  /** `"relay"`: connect only through the TURN servers the join answer names
   * (networks where nothing else gets through); default `"all"`. */
  iceTransportPolicy?: "all" | "relay";
}

/** This client's downlink as the server sees it (the `congestion` event). */
export interface Congestion {
  state: "normal" | "warning" | "congested";
  /** bit/s; 0 when unknown. */
  estimate: number;
  /** Streams whose video is paused for this client (their audio continues). */
  paused: string[];
  /** Simulcast streams this client receives on a lower layer than their best. */
  lowered: string[];
}

/** What the room asks a publisher to send (the `publishTarget` event). */
export interface PublishTarget {
  streamId: string;
  userID: string;
  bitrate: number;
  policy: "weakest" | "majority";
}

export interface PublishOptions {
  audio?: boolean;
  video?: boolean;
  /** Publish this stream instead of opening camera and microphone. */
  stream?: MediaStream;
  width?: number;
  height?: number;
  frameRate?: number;
  /** Video bitrate bounds (bit/s) the room's targets stay within (like the mini
   * program pusher's min-bitrate/max-bitrate); maxBitrate also caps the encoder. */
  minBitrate?: number;
  maxBitrate?: number;
  /** Three layers (¼, ½, full). Needs a server that forwards simulcast. */
  simulcast?: boolean;
  /** The video codec to send when the browser has it: "h264" (default: RTMP/FLV
   * players and mini programs need no transcoding) or "vp8" (for rooms with browsers
   * that have no H.264, such as Firefox without OpenH264). Subscribers receive the
   * codec sent. */
  videoCodec?: "h264" | "vp8";
}

export interface ScreenOptions {
  /** Share this stream's video instead of asking the browser (`getDisplayMedia`). */
  stream?: MediaStream;
  /** Asked of `getDisplayMedia` (default 15). */
  frameRate?: number;
  /** Caps the screen's encoder (bit/s); the room's targets stay within it. */
  maxBitrate?: number;
  videoCodec?: "h264" | "vp8";
}

export interface PlayUrls {
  rtmp: string;
  flv: string;
  webrtc: string;
}

export interface StreamInfo {
  streamId: string;
  userID: string;
  source: "webrtc" | "rtmp";
  audio: boolean;
  video: boolean;
  /** A screen share (`…_aux`, video only) rather than a camera (`…_main`). */
  screen: boolean;
  audioMuted: boolean;
  videoMuted: boolean;
  urls: PlayUrls;
}

export interface KindStats {
  codec?: string;
  bitrate?: number | null;
  packetsReceived?: number;
  packetsSent?: number;
  packetsLost?: number;
  fractionLost?: number;
  jitterMs?: number | null;
  jitterBufferMs?: number | null;
  width?: number;
  height?: number;
  fps?: number;
  framesDecoded?: number;
  freezeCount?: number;
  audioLevel?: number;
  totalAudioEnergy?: number;
  limitation?: string;
}

export interface StreamStats {
  streamId: string;
  local?: boolean;
  rttMs: number | null;
  video: KindStats;
  audio: KindStats;
}

export class WeirError extends Error {
  code: number;
  request: string | null;
  tencentCode?: number;
}

export function preferH264(codecs: RTCRtpCodec[]): RTCRtpCodec[];
export function preferCodec(codecs: RTCRtpCodec[], name?: "h264" | "vp8"): RTCRtpCodec[];

export class WeirRoom extends EventTarget {
  constructor(options: WeirOptions);
  readonly url: string;
  state: "idle" | "joining" | "joined" | "reconnecting" | "left";
  localStream: MediaStream | null;
  ownStream: StreamInfo | null;
  streams: Map<string, { info: StreamInfo; stream: MediaStream | null }>;
  members: Set<string>;
  rttMs: number | null;
  /** The latest `congestion` event, or undefined before the first. */
  congestion?: Congestion;
  on(type: string, handler: (detail: any) => void): this;
  start(publish?: PublishOptions | false): Promise<void>;
  join(): Promise<any>;
  publish(options?: PublishOptions): Promise<StreamInfo>;
  unpublish(): Promise<void>;
  /** Shares a screen beside the camera: a second stream, on its own connection. */
  publishScreen(options?: ScreenOptions): Promise<StreamInfo>;
  unpublishScreen(): Promise<void>;
  /** The screen being shared, or null. */
  sharing: { stream: MediaStream; info: StreamInfo; maxBitrate?: number } | null;
  pause(): void;
  resume(): void;
  muteAudio(muted: boolean): void;
  muteVideo(muted: boolean): void;
  switchCamera(): Promise<MediaStreamTrack>;
  subscribe(streamIds: string[]): void;
  unsubscribe(streamIds: string[]): void;
  sendTextMsg(text: string): void;
  /** A live room's stage (PROTOCOL.md `linkMic`). */
  requestJoinAnchor(reason?: string): void;
  responseJoinAnchor(userID: string, accept: boolean, reason?: string): void;
  kickoutJoinAnchor(userID: string): void;
  getStats(): Promise<Map<string, StreamStats>>;
  stop(): Promise<void>;
  leave(): Promise<void>;
}
