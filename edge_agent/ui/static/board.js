// The status page's script: renders the board (services.board) and keeps it live over server-sent events.
// Every word comes from the setup the server put in the page, in the custodian's language.
"use strict";
(function () {
  const setup = JSON.parse(document.getElementById("setup").textContent);
  const T = (text) => setup.strings[text] || text;
  const STATES = { identifying: "Identifying recorder", ingesting: "Collecting", paused: "Paused",
                   done: "Safe to take", error: "Stuck" };

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined) node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  function bytes(n) {
    if (n === null || n === undefined) return "";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let value = n, unit = 0;
    while (Math.abs(value) >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
    return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
  }

  function duration(s) {
    if (s === null || s === undefined) return "";
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
    return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  }

  function days(d) {
    if (d < 1) return `${Math.max(1, Math.round(d * 24))} ${T("hour(s)")}`;
    return `${d < 10 ? d.toFixed(1) : Math.round(d)} ${T("day(s)")}`;
  }

  function clock(ms) {
    const d = new Date(ms);
    const pad = (n) => String(n).padStart(2, "0");
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}`;
  }

  function row(dl, term, value) {
    dl.append(el("dt", {}, T(term)), el("dd", {}, value === null || value === undefined || value === "" ? "—" : String(value)));
  }

  function bayTile(bay) {
    const state = T(STATES[bay.state] || bay.state);
    const tile = el("article", { class: `bay ${bay.state}`, tabindex: "0", "data-bay": bay.key,
                                 "data-state": bay.state, "data-safe": String(bay.safe_to_take),
                                 "aria-label": `${bay.label}: ${state}` });
    tile.append(el("div", { class: "label" }, bay.label), el("div", { class: "state" }, state));
    const percent = bay.bytes_total ? Math.round(100 * bay.bytes_copied / bay.bytes_total) : (bay.safe_to_take ? 100 : 0);
    const bar = el("div", { class: "bar", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100",
                            "aria-valuenow": String(percent) });
    const fill = el("span");
    fill.style.width = `${percent}%`;
    bar.append(fill);
    tile.append(bar);
    const dl = el("dl");
    row(dl, "Device", bay.device_id || T("unknown"));
    row(dl, "Model", bay.model);
    row(dl, "Officer", bay.officer_name ? (bay.officer_id ? `${bay.officer_name} (${bay.officer_id})` : bay.officer_name)
                                        : bay.officer_id);
    row(dl, "Files", `${bay.files_done} / ${bay.files_total}`);
    row(dl, "Data", `${bytes(bay.bytes_copied)} / ${bytes(bay.bytes_total)}`);
    if (bay.state === "ingesting") {
      row(dl, "Rate", bay.rate_bps ? `${bytes(Math.round(bay.rate_bps))}/s` : "");
      row(dl, "Time left", duration(bay.eta_s));
    }
    tile.append(dl);
    if (bay.stuck) {
      tile.append(el("div", { class: "reason bad" }, setup.stuck[bay.stuck] || "", bay.error ? ` (${bay.error})` : ""));
    } else if (!bay.safe_to_take) {
      tile.append(el("div", { class: "reason warn" }, T("Do not remove: collection in progress")));
    }
    return tile;
  }

  function render(board) {
    document.getElementById("title").textContent = T("Evidence collection status");
    document.getElementById("agent").textContent = `${board.unit} · ${board.agent_id}`;
    document.getElementById("bays-title").textContent = T("Body-worn recorders");
    document.getElementById("uplink-title").textContent = T("Uplink");
    document.getElementById("disk-title").textContent = T("Storage");
    document.getElementById("cameras-title").textContent = T("Cameras");

    const alarms = document.getElementById("alarms");
    // The daemon's own message is English: on a page in another language what to do leads, in the page's
    // words, and the message follows in small type for whoever services the agent.
    const translated = setup.language !== "en";
    alarms.replaceChildren(...board.alarms.map((a) => {
      const advice = setup.advice[a.kind] || setup.default_advice;
      return el("div", { class: "alarm", "data-alarm": a.key, tabindex: "0" },
        el("strong", {}, `${T("Alarms")}: ${translated ? advice : a.message}`),
        el("span", { class: translated ? "detail" : "advice" }, translated ? a.message : advice),
        el("span", { class: "since" }, `${T("since")} ${clock(a.raised_ms)} · ${a.subject}`));
    }));
    if (!board.alarms.length) alarms.replaceChildren();
    alarms.dataset.count = String(board.alarms.length);

    const bays = document.getElementById("bays");
    bays.replaceChildren(...(board.bays.length ? board.bays.map(bayTile)
                                               : [el("p", { class: "empty" }, T("No body-worn recorder is docked."))]));

    const up = board.uplink;
    const uplink = document.getElementById("uplink");
    if (!up.configured) {
      uplink.replaceChildren(el("div", { class: "warn" }, T("Uplink not configured")));
    } else {
      uplink.replaceChildren(...[
        el("div", { class: up.connected ? "ok" : "bad" }, T(up.connected ? "Connected" : "Not connected")),
        el("div", {}, up.backlog_files ? `${T("Waiting for upload")}: ${up.backlog_files} ${T("file(s)")}, ${bytes(up.backlog_bytes)}`
                                       : T("All synced")),
        up.oldest_unsynced_age_s !== null ? el("div", {}, `${T("Oldest not yet synced")}: ${duration(up.oldest_unsynced_age_s)}`) : null,
      ].filter((node) => node !== null));
    }

    const disk = board.disk;
    const meter = el("div", { class: "meter", role: "meter", "aria-valuenow": String(disk.used_percent) });
    const fill = el("span");
    fill.style.width = `${disk.used_percent}%`;
    meter.append(fill);
    document.getElementById("disk").replaceChildren(
      el("div", { class: disk.used_percent >= 85 ? "bad" : "" }, `${disk.used_percent}% ${T("used")}`), meter,
      el("div", {}, `${bytes(disk.free_bytes)} ${T("free")}`),
      el("div", { id: "days-until-full", class: disk.days_until_full !== null && disk.days_until_full < 7 ? "bad" : "" },
         disk.days_until_full === null ? T("No recent intake to project")
                                       : `${T("Full in about")} ${days(disk.days_until_full)}`));

    const cameras = document.getElementById("cameras");
    cameras.replaceChildren(...(board.cameras.length ? board.cameras.map((c) => el("li", { class: "camera", tabindex: "0",
                                                                                        "data-camera": c.name },
      c.thumbnail_ms ? el("img", { class: "thumb", width: "160", alt: `${T("Last picture")}: ${c.name}`,
                                   src: `/cameras/${encodeURIComponent(c.name)}/thumbnail.jpg?t=${c.thumbnail_ms}` }) : null,
      el("strong", {}, c.name), " ", el("span", { class: c.connected ? "ok" : "bad" }, T(c.connected ? "Connected" : "Not connected")),
      " · ", el("span", { class: c.recording ? "ok" : "bad" }, T(c.recording ? "Recording" : "Not recording")),
      " · ", `${T("Gaps today")}: ${c.gaps_today}`))
      : [el("li", { class: "empty" }, T("No cameras configured."))]));
    document.body.dataset.ts = String(board.ts_ms);
  }

  const live = document.getElementById("live");
  render(setup.board);
  const events = new EventSource("/events");
  events.addEventListener("board", (event) => {
    render(JSON.parse(event.data));
    live.textContent = `● ${T("Live")}`;
    live.classList.remove("lost");
  });
  events.onerror = () => {
    live.textContent = T("Connection to the agent lost; retrying");
    live.classList.add("lost");
  };
})();
