// voxcore dashboard: the live list of calls and one call's timeline, over Server-Sent Events.
// No build step. Every event is shown once: ids already shown are skipped (a reconnection resumes
// with Last-Event-ID, and the server replays exactly the gap; a `reset` event restarts the timeline).
"use strict";

(function () {
  const params = new URLSearchParams(window.location.search);
  const token = params.get("token") || "";
  const EVENT_TYPES = ["call_started", "call_ended", "user_text", "answer_text", "turn", "handover",
                       "summary_cache", "hybrid_item", "error"];
  const $ = (id) => document.getElementById(id);

  function setStatus(state, text) {
    const el = $("status");
    el.dataset.state = state;
    el.textContent = text || state;
  }

  // One resumable EventSource: reconnects by itself (EventSource does, with Last-Event-ID); if the
  // browser gives up (readyState CLOSED), it is reopened with ?last_event_id= after a pause.
  function follow(path, handlers, onState) {
    let source = null;
    let lastId = null;
    let closed = false;
    function open() {
      const query = new URLSearchParams({ token: token });
      if (lastId) query.set("last_event_id", lastId);
      source = new EventSource(path + "?" + query.toString());
      onState("connecting");
      source.onopen = () => onState("live");
      source.onerror = () => {
        if (closed) return;
        if (source.readyState === EventSource.CLOSED) {
          onState("reconnecting");
          setTimeout(() => { if (!closed) open(); }, 1000);
        } else {
          onState("reconnecting");
        }
      };
      for (const type of EVENT_TYPES) {
        source.addEventListener(type, (message) => {
          if (message.lastEventId) lastId = message.lastEventId;
          let event;
          try { event = JSON.parse(message.data); } catch (e) { return; }
          handlers.event(event);
        });
      }
      source.addEventListener("reset", (message) => {
        lastId = null;
        handlers.reset(JSON.parse(message.data));
      });
      source.addEventListener("unavailable", () => onState("reconnecting", "store unavailable, retrying"));
      source.addEventListener("closed", (message) => onState("reconnecting", "cut: " + JSON.parse(message.data).reason));
    }
    open();
    return { close() { closed = true; if (source) source.close(); } };
  }

  // -- the list of calls ------------------------------------------------------------------------

  const calls = new Map();
  let selected = null;

  function renderCall(sessionId) {
    const call = calls.get(sessionId);
    let li = document.querySelector(`#calls li[data-session="${CSS.escape(sessionId)}"]`);
    if (!li) {
      li = document.createElement("li");
      li.dataset.session = sessionId;
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = sessionId;
      const state = document.createElement("span");
      state.className = "state";
      li.append(name, state);
      li.addEventListener("click", () => selectCall(sessionId));
      $("calls").prepend(li);
    }
    li.dataset.state = call.ended ? "ended" : "live";
    li.querySelector(".state").textContent = call.ended ? "ended" : "live";
  }

  function followIndex() {
    const seen = new Set();
    follow("/index/events", {
      event(event) {
        if (seen.has(event.id)) return;
        seen.add(event.id);
        const sessionId = event.data.session_id;
        if (!sessionId) return;
        const call = calls.get(sessionId) || { ended: false };
        if (event.type === "call_started") call.ended = false;
        if (event.type === "call_ended") call.ended = true;
        calls.set(sessionId, call);
        renderCall(sessionId);
      },
      reset() { seen.clear(); calls.clear(); $("calls").replaceChildren(); },
    }, (state, text) => { if (!selected) setStatus(state, text); });
  }

  // -- one call's timeline ----------------------------------------------------------------------

  let callStream = null;
  const shown = new Set();

  function describe(event) {
    const d = event.data || {};
    const ms = (v) => (v === null || v === undefined) ? "–" : `${Math.round(v)} ms`;
    switch (event.type) {
      case "call_started": return d.resumed ? `resumed with ${d.restored_messages} messages` : "call started";
      case "call_ended": return `call ended after ${d.turns ?? "?"} turns`;
      case "user_text": return `#${d.turn} caller: ${d.text}`;
      case "answer_text": return `#${d.turn} bot: ${d.text}`;
      case "turn":
        if (d.time_to_first_audio_ms !== undefined && d.outcome === undefined) {
          return `#${d.turn} first audio ${ms(d.time_to_first_audio_ms)}`;
        }
        return `#${d.turn} ${d.outcome || "ok"} · first token ${ms(d.time_to_first_token_ms)} · first text ` +
               `${ms(d.time_to_first_text_ms)} · total ${ms(d.response_total_ms)}` +
               (d.handover_ms ? ` · handover ${ms(d.handover_ms)}` : "");
      case "handover": return `handover in ${ms(d.handover_ms)} (ratio ${Number(d.ratio_before).toFixed(2)} → ${Number(d.ratio_after).toFixed(2)})`;
      case "summary_cache": return `summary cache ${d.hit ? "hit" : "miss"}`;
      case "hybrid_item":
        return `hybrid ${d.kind}` + (d.count ? ` ×${d.count}` : "") + (d.item ? `: ${d.item}` : "") +
               (d.index !== undefined ? ` · item ${d.index} ${d.item_kind || ""}` : "") + (d.key ? ` ${d.key}` : "") +
               (d.first_byte_ms != null ? ` · first byte ${ms(d.first_byte_ms)}` : "") +
               (d.tts_ttfb_ms ? ` · TTS first byte ${ms(d.tts_ttfb_ms)}` : "");
      case "error": return `${d.error_type}: ${d.message}`;
      default: return JSON.stringify(d);
    }
  }

  function addEvent(event) {
    if (shown.has(event.id)) return;  // exactly once, whatever the reconnections
    shown.add(event.id);
    const li = document.createElement("li");
    li.dataset.eventId = event.id;
    li.dataset.type = event.type;
    const type = document.createElement("span");
    type.className = "type";
    type.textContent = event.type;
    const text = document.createElement("span");
    text.className = event.type === "turn" ? "figures" : "text";
    text.textContent = describe(event);
    li.append(type, text);
    $("timeline").append(li);
    $("event-count").textContent = String(shown.size);
    $("last-id").textContent = event.id;
  }

  function selectCall(sessionId) {
    if (callStream) callStream.close();
    selected = sessionId;
    shown.clear();
    $("timeline").replaceChildren();
    $("event-count").textContent = "0";
    $("call-title").textContent = "Call " + sessionId;
    document.querySelectorAll("#calls li").forEach((li) => li.classList.toggle("selected", li.dataset.session === sessionId));
    callStream = follow("/calls/" + encodeURIComponent(sessionId) + "/events", {
      event: addEvent,
      reset(info) {
        shown.clear();
        $("timeline").replaceChildren();
        const li = document.createElement("li");
        li.dataset.type = "reset";
        li.textContent = `events before ${info.oldest_id} are no longer stored; the timeline restarts`;
        $("timeline").append(li);
      },
    }, setStatus);
  }

  const session = params.get("session");
  if (session) {
    $("calls-note").textContent = "one call (session token)";
    selectCall(session);
  } else {
    followIndex();
  }
})();
