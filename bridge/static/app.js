// gitfaas dashboard. Plain JavaScript, no library, no build step.
//
// Rules this file keeps: every value from the server is put on the page as text (element.textContent,
// text nodes, setAttribute on attributes that cannot run code) — never as HTML; no inline script or
// event handler (the Content-Security-Policy forbids them); the token, when the bridge asks for one,
// lives in sessionStorage and travels only in the Authorization header, never in a URL.
'use strict';

(() => {
  const TOKEN_KEY = 'gitfaas.token';
  const RUN_STATES = ['running', 'succeeded', 'failed', 'cancelled'];
  const FINAL = new Set(['succeeded', 'failed', 'dead', 'cancelled', 'unknown', 'expired']);
  const BUILTINS = new Set(['MESSAGE', 'PAYLOAD', 'REQUEST_UUID', 'REQUEST_ID', 'FUNCTION_UID', 'RANDOM', 'TOPIC',
    'NATS_URL', 'BRIDGE_URL']);
  const COUNTS_EVERY_MS = 2000;
  const DEAD_EVERY_MS = 5000;
  const MAX_TIMELINE_ROWS = 400;

  const main = document.getElementById('main');
  const live = document.getElementById('live');
  const toastBox = document.getElementById('toast');
  const prompt = document.getElementById('token-prompt');
  const forget = document.getElementById('forget-token');

  // ---- building the page from data, as text ------------------------------------------------

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key.startsWith('on')) el.addEventListener(key.slice(2), value);
      else if (key === 'class') el.className = value;
      else if (key === 'dataset') Object.assign(el.dataset, value);
      else if (value === true) el.setAttribute(key, '');
      else el.setAttribute(key, String(value));
    }
    add(el, children);
    return el;
  }

  function add(el, children) {
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  function fill(el, ...children) {  // replaceChildren, skipping null and false as h() does
    el.replaceChildren();
    return add(el, children);
  }

  const link = (hash, ...children) => h('a', { href: hash }, ...children);
  const runHref = (id) => '#/runs/' + encodeURIComponent(id);
  const short = (id) => (id ? String(id).slice(0, 8) : '');
  const badge = (state) => h('span', { class: 'badge s-' + cssToken(state) }, state || '?');
  const cssToken = (text) => String(text || 'unknown').replace(/[^a-z0-9-]/gi, '');

  function toast(message, isError) {
    toastBox.textContent = message;
    toastBox.className = 'toast' + (isError ? ' error' : '');
    toastBox.hidden = false;
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => { toastBox.hidden = true; }, isError ? 8000 : 4000);
  }

  // ---- time ----------------------------------------------------------------------------------

  const ms = (iso) => (iso ? Date.parse(iso) : NaN);

  function ago(iso) {
    const t = ms(iso);
    if (Number.isNaN(t)) return '—';
    const s = Math.round((Date.now() - t) / 1000);
    if (s < 0) return 'in ' + span(-s * 1000);
    if (s < 5) return 'just now';
    return span(s * 1000) + ' ago';
  }

  function span(milliseconds) {
    if (milliseconds === null || milliseconds === undefined || Number.isNaN(milliseconds)) return '—';
    const s = milliseconds / 1000;
    if (s < 10) return s.toFixed(1) + 's';
    if (s < 60) return Math.round(s) + 's';
    const m = Math.floor(s / 60);
    if (m < 60) return m + 'm ' + Math.round(s - m * 60) + 's';
    const hours = Math.floor(m / 60);
    if (hours < 48) return hours + 'h ' + (m - hours * 60) + 'm';
    return Math.floor(hours / 24) + 'd ' + (hours % 24) + 'h';
  }

  const when = (iso) => (iso ? h('span', { title: new Date(ms(iso)).toLocaleString() }, ago(iso)) : '—');

  // ---- the API -------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message, data) { super(message); this.status = status; this.data = data; }
  }
  class NeedToken extends Error {}

  const token = () => sessionStorage.getItem(TOKEN_KEY) || '';

  function authHeaders(extra) {
    const headers = Object.assign({}, extra);
    if (token()) headers.Authorization = 'Bearer ' + token();
    return headers;
  }

  async function api(path, options) {
    const { method = 'GET', text = false, signal } = options || {};
    const response = await fetch(path, { method, headers: authHeaders(), cache: 'no-store', signal });
    if (response.status === 401) { askToken(Boolean(token())); throw new NeedToken(); }
    const type = response.headers.get('Content-Type') || '';
    const data = !text && type.includes('json') ? await response.json() : await response.text();
    if (!response.ok) {
      const message = data && data.error ? data.error : (typeof data === 'string' && data) || response.statusText;
      throw new ApiError(response.status, message, data);
    }
    return data;
  }

  const post = (path) => api(path, { method: 'POST' });

  // Server-sent events read with fetch, so that the Authorization header goes along (an EventSource
  // cannot send one). Reconnects after a pause when the stream ends; stops with the page.
  function watch(path, onEvent, onProblem) {
    const controller = page.controller;
    (async () => {
      while (!controller.signal.aborted) {
        try {
          const response = await fetch(path, { headers: authHeaders(), cache: 'no-store', signal: controller.signal });
          if (response.status === 401) { askToken(Boolean(token())); return; }
          if (!response.ok) {
            const data = await response.json().catch(() => ({}));
            throw new ApiError(response.status, data.error || response.statusText, data);
          }
          setLive(true);
          const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
          let buffer = '';
          for (;;) {
            const { value, done } = await reader.read();
            if (done) break;
            buffer += value;
            let end;
            while ((end = buffer.indexOf('\n\n')) >= 0) {
              const block = buffer.slice(0, end);
              buffer = buffer.slice(end + 2);
              let event = 'message';
              const data = [];
              for (const line of block.split('\n')) {
                if (line.startsWith('event:')) event = line.slice(6).trim();
                else if (line.startsWith('data:')) data.push(line.slice(5).trimStart());
              }
              if (data.length && !controller.signal.aborted) onEvent(event, JSON.parse(data.join('\n')));
            }
          }
        } catch (error) {
          if (controller.signal.aborted) return;
          if (error instanceof ApiError && error.status >= 400 && error.status < 500) {
            if (onProblem) onProblem(error);
            setLive(null);
            return;
          }
        }
        setLive(false);
        await sleep(2000, controller.signal);
      }
    })();
  }

  const sleep = (milliseconds, signal) => new Promise((resolve) => {
    const timer = setTimeout(resolve, milliseconds);
    if (signal) signal.addEventListener('abort', () => { clearTimeout(timer); resolve(); }, { once: true });
  });

  function setLive(on) {
    live.hidden = on === null;
    live.className = 'live ' + (on ? 'on' : 'off');
    live.textContent = on ? 'live' : 'reconnecting…';
  }

  // ---- pages ---------------------------------------------------------------------------------

  let page = { controller: new AbortController(), timers: [] };

  function every(milliseconds, fn) {
    const current = page;
    const tick = async () => {
      if (current !== page) return;
      try { await fn(); } catch (error) { if (!(error instanceof NeedToken)) console.warn(error); }
      if (current === page) current.timers.push(setTimeout(tick, milliseconds));
    };
    current.timers.push(setTimeout(tick, milliseconds));
  }

  function leavePage() {
    page.controller.abort();
    page.timers.forEach(clearTimeout);
    page = { controller: new AbortController(), timers: [] };
    setLive(null);
  }

  function askToken(wasWrong) {
    leavePage();
    if (wasWrong) sessionStorage.removeItem(TOKEN_KEY);
    main.replaceChildren();
    const error = document.getElementById('token-error');
    error.hidden = !wasWrong;
    error.textContent = wasWrong ? 'The bridge refused that token.' : '';
    prompt.hidden = false;
    forget.hidden = true;
    document.getElementById('token-input').focus();
  }

  document.getElementById('token-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const input = document.getElementById('token-input');
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    input.value = '';
    prompt.hidden = true;
    route();
  });

  forget.addEventListener('click', () => { sessionStorage.removeItem(TOKEN_KEY); askToken(false); });

  function route() {
    leavePage();
    prompt.hidden = true;
    forget.hidden = !token();
    const [path, query] = (location.hash.slice(1) || '/').split('?');
    const params = new URLSearchParams(query || '');
    let name = 'overview';
    let view;
    const runMatch = path.match(/^\/runs\/([A-Za-z0-9_-]{1,128})$/);
    if (path === '/' || path === '') view = overview();
    else if (path === '/runs') { name = 'runs'; view = runsPage(params); }
    else if (runMatch) { name = 'runs'; view = runPage(runMatch[1]); }
    else if (path === '/dead') { name = 'dead'; view = deadPage(); }
    else { name = ''; main.replaceChildren(h('div', { class: 'card' }, 'No such page. ', link('#/', 'Overview'))); }
    for (const a of document.querySelectorAll('#nav a')) a.classList.toggle('current', a.dataset.page === name);
    if (view) view.catch(showError);
  }

  function showError(error) {
    if (error instanceof NeedToken || (error && error.name === 'AbortError')) return;
    main.replaceChildren(h('div', { class: 'alert error' }, String(error && error.message ? error.message : error)));
  }

  window.addEventListener('hashchange', route);

  // ---- overview ------------------------------------------------------------------------------

  async function overview() {
    const current = page;
    const state = await api('/topics');
    if (current !== page) return;
    const countsBox = h('div', { class: 'counts', id: 'counts' },
      countTile('in-flight', 'in flight', 'handed to a consumer, not yet acknowledged'),
      countTile('pending', 'pending in the stream', 'stored, waiting for a consumer'),
      countTile('dead', 'dead letters', 'given up on: see Dead letters'));
    const refresh = h('button', { type: 'button', id: 'refresh', onclick: () => doRefresh(refresh) }, 'Refresh');
    main.replaceChildren(
      h('div', { class: 'pagehead' }, h('h1', {}, 'Overview')),
      h('div', { class: 'row' },
        h('section', { class: 'card', id: 'repository' },
          h('div', { class: 'pagehead' }, h('h2', {}, 'Repository'), h('span', { class: 'spacer' }), refresh),
          repositoryFacts(state)),
        h('section', { class: 'card' }, h('h2', {}, 'Now'), countsBox)),
      h('section', { class: 'card' }, h('h2', {}, 'Topics'), topicsTable(state.topics || [])));
    await updateCounts();
    every(COUNTS_EVERY_MS, updateCounts);
  }

  function countTile(id, what, help) {
    return h('div', { class: 'count', id: 'count-' + id, title: help },
      h('div', { class: 'n' }, '…'), h('div', { class: 'what' }, what));
  }

  async function updateCounts() {
    const counts = await api('/stats');
    const set = (id, value, alerting) => {
      const tile = document.getElementById('count-' + id);
      if (!tile) return;
      tile.querySelector('.n').textContent = value === null || value === undefined ? '—' : String(value);
      tile.classList.toggle('alerting', Boolean(alerting));
    };
    set('in-flight', counts.in_flight);
    set('pending', counts.pending);
    set('dead', counts.dead_letters, counts.dead_letters > 0);
  }

  function repositoryFacts(state) {
    const facts = h('dl', { class: 'facts' },
      h('dt', {}, 'Commit'), h('dd', { class: 'mono', id: 'commit', title: state.commit || '' },
        state.commit ? String(state.commit).slice(0, 12) : 'none loaded'),
      h('dt', {}, 'Loaded'), h('dd', { id: 'loaded-at' }, when(state.loaded_at)),
      h('dt', {}, 'Topics'), h('dd', {}, String((state.topics || []).length)));
    const parts = [facts];
    if (state.error) {
      parts.push(h('div', { class: 'alert error', id: 'config-error' },
        h('strong', {}, state.commit ? 'The last commit was refused; the one above keeps serving.' : 'No configuration:'),
        '\n', state.error));
    }
    return parts;
  }

  async function doRefresh(button) {
    button.disabled = true;
    try {
      const state = await post('/refresh');
      toast('Repository refreshed: commit ' + String(state.commit || 'none').slice(0, 12) +
        (state.error ? ' (the newest commit was refused)' : ''), Boolean(state.error));
      route();
    } catch (error) {
      if (!(error instanceof NeedToken)) toast('Refresh failed: ' + error.message, true);
    } finally {
      button.disabled = false;
    }
  }

  function topicsTable(topics) {
    if (!topics.length) return h('p', { class: 'empty' }, 'No topics: no configuration is loaded.');
    return h('table', { id: 'topics' },
      h('thead', {}, h('tr', {}, ['Topic', 'Manifests', 'Variables', 'Parameters', 'Schedule', 'Settings'].map((t) => h('th', {}, t)))),
      h('tbody', {}, topics.map(topicRow)));
  }

  function topicRow(topic) {
    const params = Object.entries(topic.params || {});
    const settings = [];
    if (topic.namespace) settings.push('namespace ' + topic.namespace);
    if (topic.retries) settings.push('retries ' + topic.retries);
    if (topic.maxConcurrency) settings.push('maxConcurrency ' + topic.maxConcurrency);
    if (topic.maxActiveJobs) settings.push('maxActiveJobs ' + topic.maxActiveJobs);
    return h('tr', { dataset: { topic: topic.name } },
      h('td', {}, h('strong', {}, link('#/runs?topic=' + encodeURIComponent(topic.name), topic.name))),
      h('td', {}, h('div', { class: 'chips' }, (topic.configs || []).map((c) => h('code', { class: 'chip' }, c)))),
      h('td', {}, h('div', { class: 'chips' }, (topic.variables || []).map((v) =>
        h('code', { class: 'chip' + (BUILTINS.has(v) ? ' builtin' : '') }, v)))),
      h('td', {}, params.length ? h('div', { class: 'chips' }, params.map(([name, value]) =>
        value === null ? h('code', { class: 'chip required', title: 'every message must give it' }, name + ' (required)')
          : h('code', { class: 'chip' }, name + ' = ' + JSON.stringify(value)))) : h('span', { class: 'muted' }, '—')),
      h('td', {}, topic.schedule ? [h('code', {}, topic.schedule), ' ', h('span', { class: 'muted' }, topic.timezone || 'UTC'),
        h('div', { class: 'small muted' }, 'next ', topic.next_tick ? when(topic.next_tick) : '—')] : h('span', { class: 'muted' }, '—')),
      h('td', { class: 'small' }, settings.length ? settings.join(', ') : h('span', { class: 'muted' }, '—')));
  }

  // ---- runs ----------------------------------------------------------------------------------

  async function runsPage(params) {
    const current = page;
    const topic = params.get('topic') || '';
    const state = params.get('state') || '';
    const config = await api('/topics').catch((error) => { if (error instanceof NeedToken) throw error; return { topics: [] }; });
    if (current !== page) return;
    const names = (config.topics || []).map((t) => t.name);
    if (topic && !names.includes(topic)) names.push(topic);
    const topicSelect = h('select', { id: 'filter-topic', 'aria-label': 'topic' },
      h('option', { value: '' }, 'all topics'), names.map((n) => h('option', { value: n, selected: n === topic }, n)));
    const stateSelect = h('select', { id: 'filter-state', 'aria-label': 'state' },
      h('option', { value: '' }, 'all states'), RUN_STATES.map((s) => h('option', { value: s, selected: s === state }, s)));
    const refilter = () => {
      const q = new URLSearchParams();
      if (topicSelect.value) q.set('topic', topicSelect.value);
      if (stateSelect.value) q.set('state', stateSelect.value);
      location.hash = '#/runs' + (q.toString() ? '?' + q : '');
    };
    topicSelect.addEventListener('change', refilter);
    stateSelect.addEventListener('change', refilter);
    const body = h('tbody', { id: 'runs-body' }, h('tr', {}, h('td', { colspan: 7, class: 'empty' }, 'Loading…')));
    main.replaceChildren(
      h('div', { class: 'pagehead' }, h('h1', {}, 'Runs'), h('span', { class: 'spacer' }), topicSelect, stateSelect),
      h('section', { class: 'card' }, h('table', { id: 'runs' },
        h('thead', {}, h('tr', {}, ['State', 'Run', 'Topic', 'Started', 'Duration', 'Steps', ''].map((t) =>
          h('th', { class: t === 'Duration' || t === 'Steps' ? 'num' : null }, t)))),
        body)));
    let runs = [];
    const draw = () => {
      body.replaceChildren(...(runs.length ? runs.map(runRow)
        : [h('tr', {}, h('td', { colspan: 7, class: 'empty' }, 'No runs' + (topic || state ? ' match these filters.' : ' yet.')))]));
    };
    const q = new URLSearchParams();
    if (topic) q.set('topic', topic);
    if (state) q.set('state', state);
    watch('/watch/runs' + (q.toString() ? '?' + q : ''), (event, data) => {
      if (event === 'runs') { runs = data.runs || []; draw(); }
    }, (error) => body.replaceChildren(h('tr', {}, h('td', { colspan: 7 }, h('div', { class: 'alert error' }, error.message)))));
    every(1000, () => { if (runs.some((r) => r.state === 'running')) draw(); });  // durations tick; nothing fetched
  }

  function runDuration(run) {
    const end = run.finished_at ? ms(run.finished_at) : (run.state === 'running' ? Date.now() : NaN);
    return span(end - ms(run.started_at));
  }

  function runRow(run) {
    const failed = run.failed_step;
    return h('tr', { class: 'clickable', dataset: { run: run.run_id, state: run.state },
      onclick: (event) => { if (!event.target.closest('a')) location.hash = runHref(run.run_id); } },
    h('td', {}, badge(run.state)),
    h('td', {}, link(runHref(run.run_id), h('code', { title: run.run_id }, short(run.run_id)))),
    h('td', {}, run.topic || '—'),
    h('td', {}, when(run.started_at)),
    h('td', { class: 'num' }, runDuration(run)),
    h('td', { class: 'num' }, String(run.steps ?? '—')),
    h('td', { class: 'small' }, failed ? h('span', { class: 'error-text' }, (failed.topic || '') + ': ' + clip(failed.error, 140)) : ''));
  }

  const clip = (text, n) => { const s = String(text ?? ''); return s.length > n ? s.slice(0, n - 1) + '…' : s; };

  // ---- one run -------------------------------------------------------------------------------

  async function runPage(id) {
    const current = page;
    const title = h('h1', {}, 'Run ', h('code', { id: 'run-id', title: id }, short(id)));
    const stateBox = h('span', { id: 'run-state' });
    const cancel = h('button', { type: 'button', id: 'cancel', class: 'danger', disabled: true }, 'Cancel');
    const replay = h('button', { type: 'button', id: 'replay', disabled: true }, 'Replay');
    const meta = h('div', { class: 'muted', id: 'run-meta' });
    const timelineBox = h('div', { class: 'timeline', id: 'timeline' }, h('p', { class: 'empty' }, 'Loading…'));
    const detailBox = h('section', { class: 'card', id: 'step', hidden: true });
    main.replaceChildren(
      h('div', { class: 'pagehead' }, link('#/runs', '← Runs'), title, stateBox, h('span', { class: 'spacer' }), replay, cancel),
      meta,
      h('div', { class: 'alert error', id: 'run-failure', hidden: true }),
      h('section', { class: 'card' }, h('h2', {}, 'Timeline'), timelineBox, legend()),
      detailBox);
    const view = { run: null, selected: null, logsFor: null, logsState: null };

    cancel.addEventListener('click', async () => {
      cancel.disabled = true;
      try {
        const answer = await post('/runs/' + encodeURIComponent(view.run.run_id) + '/cancel');
        const deleted = Array.isArray(answer.jobs_deleted) ? answer.jobs_deleted.length : 0;
        toast('Run cancelled' + (deleted ? '; ' + deleted + ' Job(s) deleted' : '') + (answer.warning ? ' — ' + answer.warning : ''));
      } catch (error) {
        if (!(error instanceof NeedToken)) toast('Cancel refused: ' + error.message, true);
        cancel.disabled = false;
      }
    });
    replay.addEventListener('click', () => replayRequest(view.run.run_id, replay));

    const draw = () => {
      const run = view.run;
      if (!run || current !== page) return;
      stateBox.replaceChildren(badge(run.state));
      title.querySelector('code').textContent = short(run.run_id);
      fill(meta, h('strong', {}, run.topic || ''), ' · started ', when(run.started_at), ' · ', runDuration(run),
        ' · ', String(run.steps ?? run.requests.length), ' step(s)',
        run.requests_omitted ? ' (' + run.requests_omitted + ' not shown)' : '');
      cancel.disabled = run.state !== 'running';
      replay.disabled = false;
      const failure = document.getElementById('run-failure');
      const failed = run.failed_step;
      failure.hidden = !failed;
      if (failed) failure.textContent = 'Failed at ' + (failed.topic || '') + ' (' + short(failed.request_id) + '): ' + (failed.error || failed.state);
      timelineBox.replaceChildren(...timeline(run, view.selected, (rid) => { view.selected = rid; draw(); }));
      const selected = run.requests.find((r) => r.request_id === view.selected);
      detailBox.hidden = !selected;
      const signature = selected ? JSON.stringify(selected) : null;
      if (selected && signature !== view.detailSignature) stepDetails(detailBox, selected, view);  // keeps a scrolled log
      view.detailSignature = signature;
    };

    watch('/watch/runs/' + encodeURIComponent(id), (event, data) => {
      if (event !== 'run') return;
      const first = !view.run;
      view.run = data;
      if (first && !view.selected) {  // a failed run opens on its failed step
        const failed = data.failed_step && data.requests.find((r) => r.request_id === data.failed_step.request_id);
        if (failed) view.selected = failed.request_id;
      }
      draw();
    }, (error) => {
      if (current === page) main.replaceChildren(h('div', { class: 'alert error' }, error.message), link('#/runs', '← Runs'));
    });
    every(1000, () => { if (view.run && view.run.state === 'running') draw(); });  // bars grow; nothing fetched
  }

  function legend() {
    return h('div', { class: 'legend' },
      h('span', { class: 'l-wait' }, 'waiting (published → started)'), h('span', { class: 'l-running' }, 'running'),
      h('span', { class: 'l-succeeded' }, 'succeeded'), h('span', { class: 'l-failed' }, 'failed / dead'),
      h('span', { class: 'l-cancelled' }, 'cancelled'), h('span', { class: 'l-pending' }, 'pending / expired'));
  }

  function stepTimes(r, now) {
    const start = ms(r.published_at);
    const began = ms(r.started_at) || ms(r.applied_at) || start;
    let end = ms(r.finished_at);
    if (Number.isNaN(end)) end = FINAL.has(r.state) || (r.state === 'applied' && !hasJob(r)) ? Math.max(began, start) : now;
    return { start, began, end };
  }

  const hasJob = (r) => (r.documents || []).some((d) => d.kind === 'Job');

  function timeline(run, selected, select) {
    const now = Date.now();
    const rows = run.requests.slice(0, MAX_TIMELINE_ROWS);
    const times = new Map(rows.map((r) => [r.request_id, stepTimes(r, now)]));
    const starts = [...times.values()].map((t) => t.start).filter((t) => !Number.isNaN(t));
    const ends = [...times.values()].map((t) => t.end).filter((t) => !Number.isNaN(t));
    const t0 = Math.min(...starts, ms(run.started_at) || Infinity);
    if (!Number.isFinite(t0)) return [h('p', { class: 'empty' }, 'No step has a time yet.')];
    const t1 = Math.max(...ends, t0 + 1000);
    const width = t1 - t0;
    const pct = (t) => Math.max(0, Math.min(100, ((t - t0) / width) * 100));
    const depth = new Map();
    for (const r of rows) depth.set(r.request_id, r.parent && depth.has(r.parent) ? depth.get(r.parent) + 1 : 0);

    const ticks = [];
    const step = niceStep(width / 5);
    for (let t = 0; t <= width + 1; t += step) {
      ticks.push(h('span', { class: 'tl-tick' + (t === 0 ? ' first' : ''), dataset: { at: String(t) } }, t === 0 ? '0' : '+' + span(t)));
    }
    const axis = h('div', { class: 'tl-axis' }, h('span', {}, 'step'), h('div', { class: 'tl-scale' }, ticks), h('span', { class: 'tl-dur' }, 'took'));
    ticks.forEach((tick) => { tick.style.left = ((Number(tick.dataset.at) / width) * 100) + '%'; });

    const out = [axis];
    for (const r of rows) {
      const t = times.get(r.request_id);
      const state = cssToken(r.state);
      const bar = h('div', { class: 'tl-bar b-' + state, title: r.topic + ' · ' + r.state + ' · ' + span(t.end - t.start) },
        h('div', { class: 'tl-wait' }), h('div', { class: 'tl-work' }));
      const left = pct(t.start);
      bar.style.left = left + '%';
      bar.style.width = Math.max(0.4, pct(t.end) - left) + '%';
      const total = t.end - t.start;
      bar.firstChild.style.width = (total > 0 ? Math.min(100, ((t.began - t.start) / total) * 100) : 0) + '%';
      const row = h('div', {
        class: 'tl-row' + (r.request_id === selected ? ' selected' : ''), role: 'button', tabindex: 0,
        dataset: { request: r.request_id, state: r.state },
        onclick: () => select(r.request_id),
        onkeydown: (event) => { if (event.key === 'Enter' || event.key === ' ') { event.preventDefault(); select(r.request_id); } },
      },
      h('div', { class: 'tl-label' },
        depth.get(r.request_id) ? h('span', { class: 'indent' }, '  '.repeat(depth.get(r.request_id) - 1) + '└') : null,
        h('span', { class: 'topic' }, r.topic || '?'), h('code', { class: 'muted small' }, short(r.request_id)), badge(r.state)),
      h('div', { class: 'tl-track' }, bar),
      h('div', { class: 'tl-dur' }, span(total)));
      out.push(row);
    }
    if (run.requests.length > rows.length) out.push(h('p', { class: 'muted small' }, (run.requests.length - rows.length) + ' more step(s) not drawn.'));
    return out;
  }

  function niceStep(raw) {
    const candidates = [100, 200, 500, 1000, 2000, 5000, 10000, 15000, 30000, 60000, 120000, 300000, 600000, 900000,
      1800000, 3600000, 7200000, 21600000, 43200000, 86400000];
    return candidates.find((c) => c >= raw) || raw;
  }

  function stepDetails(box, r, view) {
    const jobs = (r.documents || []);
    const responses = (r.responses || []).filter((x) => x !== null && x !== undefined);
    const logs = h('pre', { class: 'block', id: 'step-logs' }, view.logsFor === r.request_id && view.logsText !== undefined ? view.logsText : 'Loading…');
    const reloadLogs = h('button', { type: 'button', id: 'reload-logs', onclick: () => loadLogs(r, view, true) }, 'Reload logs');
    const replayStep = h('button', { type: 'button', id: 'replay-step' }, 'Replay this step');
    replayStep.addEventListener('click', () => replayRequest(r.request_id, replayStep));
    fill(box,
      h('div', { class: 'pagehead' }, h('h2', {}, 'Step ', r.topic || '?'), badge(r.state), h('span', { class: 'spacer' }), replayStep),
      r.error ? h('div', { class: 'alert error', id: 'step-reason' }, r.error) : null,
      h('dl', { class: 'facts' },
        h('dt', {}, 'Request'), h('dd', { class: 'mono' }, r.request_id),
        h('dt', {}, 'Parent'), h('dd', { class: 'mono' }, r.parent || '—'),
        h('dt', {}, 'Attempts'), h('dd', {}, String(r.attempts ?? '—')),
        h('dt', {}, 'Published'), h('dd', {}, when(r.published_at)),
        h('dt', {}, 'Started'), h('dd', {}, when(r.started_at || r.applied_at)),
        h('dt', {}, 'Finished'), h('dd', {}, when(r.finished_at)),
        h('dt', {}, 'Commit'), h('dd', { class: 'mono' }, r.commit ? String(r.commit).slice(0, 12) : '—')),
      h('h3', {}, 'Objects'),
      jobs.length ? h('table', { id: 'step-jobs' },
        h('thead', {}, h('tr', {}, ['Kind', 'Name', 'Namespace', 'State', 'Reason'].map((t) => h('th', {}, t)))),
        h('tbody', {}, jobs.map((d) => h('tr', {},
          h('td', {}, d.kind || ''), h('td', { class: 'mono' }, d.name || ''), h('td', {}, d.namespace || '—'),
          h('td', {}, d.state ? badge(d.state) : '—'), h('td', { class: 'small' }, d.reason || ''))))) : h('p', { class: 'muted' }, 'Nothing applied.'),
      h('h3', {}, 'Responses'),
      responses.length ? responses.map((x) => h('pre', { class: 'block light' }, typeof x === 'string' ? x : JSON.stringify(x, null, 2)))
        : h('p', { class: 'muted' }, 'No response stored.'),
      h('div', { class: 'pagehead' }, h('h3', {}, 'Logs'), h('span', { class: 'spacer' }), reloadLogs),
      logs);
    if (view.logsFor !== r.request_id || (view.logsState !== r.state && FINAL.has(r.state))) loadLogs(r, view, false);
  }

  async function loadLogs(r, view, force) {
    if (!force && view.logsLoading === r.request_id) return;
    view.logsFor = r.request_id;
    view.logsState = r.state;
    view.logsLoading = r.request_id;
    view.logsText = undefined;
    let text;
    try {
      text = await api('/requests/' + encodeURIComponent(r.request_id) + '/logs', { text: true, signal: page.controller.signal });
      if (!text) text = hasJob(r) ? '(no output yet)' : '(this step has no Job)';
    } catch (error) {
      if (error instanceof NeedToken || error.name === 'AbortError') return;
      text = 'Logs unavailable: ' + error.message;
    } finally {
      if (view.logsLoading === r.request_id) view.logsLoading = null;
    }
    if (view.logsFor !== r.request_id) return;
    view.logsText = text;
    const pre = document.getElementById('step-logs');
    if (pre) pre.textContent = text;
  }

  async function replayRequest(requestId, button) {
    button.disabled = true;
    try {
      const answer = await post('/requests/' + encodeURIComponent(requestId) + '/replay');
      toast('Replayed as request ' + short(answer.request_id) + ' (a new step of this run, under ' + short(requestId) + ')');
    } catch (error) {
      if (!(error instanceof NeedToken)) toast('Replay refused: ' + error.message, true);
    } finally {
      button.disabled = false;
    }
  }

  // ---- dead letters --------------------------------------------------------------------------

  async function deadPage() {
    const current = page;
    const count = h('span', { class: 'muted', id: 'dead-count' });
    const redriveAll = h('button', { type: 'button', id: 'redrive-all' }, 'Redrive all');
    const purge = h('button', { type: 'button', id: 'purge', class: 'danger' }, 'Purge…');
    const confirmBox = h('div', { class: 'confirm', id: 'purge-confirm', hidden: true });
    const body = h('tbody', { id: 'dead-body' });
    const detail = h('section', { class: 'card', id: 'letter', hidden: true });
    main.replaceChildren(
      h('div', { class: 'pagehead' }, h('h1', {}, 'Dead letters'), count, h('span', { class: 'spacer' }), redriveAll, purge),
      confirmBox,
      h('section', { class: 'card' }, h('table', { id: 'dead' },
        h('thead', {}, h('tr', {}, ['Seq', 'Topic', 'Request', 'Age', 'Tries', 'Error', ''].map((t) => h('th', {}, t)))), body)),
      detail);
    const state = { letters: [], selected: null };

    const load = async () => {
      const data = await api('/dead-letters');
      if (current !== page) return;
      state.letters = data.dead_letters || [];
      count.textContent = data.count === state.letters.length ? String(data.count) + ' waiting'
        : String(data.count) + ' waiting, ' + state.letters.length + ' shown';
      redriveAll.disabled = purge.disabled = !state.letters.length;
      body.replaceChildren(...(state.letters.length ? state.letters.map(letterRow)
        : [h('tr', {}, h('td', { colspan: 7, class: 'empty' }, 'No dead letters.'))]));
      if (state.selected !== null && !state.letters.some((d) => d.seq === state.selected)) { state.selected = null; detail.hidden = true; }
    };

    const letterRow = (d) => {
      const redriveOne = h('button', { type: 'button', class: 'redrive', dataset: { seq: String(d.seq) } }, 'Redrive');
      redriveOne.addEventListener('click', async (event) => {
        event.stopPropagation();
        redriveOne.disabled = true;
        try {
          const answer = await post('/dead-letters/' + d.seq + '/redrive');
          toast('Dead letter ' + d.seq + ' redriven as request ' + short(answer.request_id));
          await load();
        } catch (error) {
          if (!(error instanceof NeedToken)) toast('Redrive failed: ' + error.message, true);
          redriveOne.disabled = false;
        }
      });
      return h('tr', { class: 'clickable' + (state.selected === d.seq ? ' selected' : ''), dataset: { seq: String(d.seq) }, onclick: () => show(d.seq) },
        h('td', { class: 'num' }, String(d.seq)), h('td', {}, d.topic), h('td', {}, link(runHref(d.request_id), h('code', { title: d.request_id }, short(d.request_id)))),
        h('td', {}, d.time ? when(d.time) : '—'), h('td', { class: 'num' }, String(d.attempts)),
        h('td', { class: 'small' }, clip(d.error, 200)), h('td', {}, redriveOne));
    };

    const show = async (seq) => {
      state.selected = seq;
      for (const tr of body.querySelectorAll('tr')) tr.classList.toggle('selected', tr.dataset.seq === String(seq));
      const d = await api('/dead-letters/' + seq);
      if (current !== page) return;
      detail.hidden = false;
      detail.replaceChildren(
        h('h2', {}, 'Dead letter ' + d.seq),
        h('div', { class: 'alert error', id: 'letter-error' }, d.error || '(no error recorded)'),
        h('dl', { class: 'facts' },
          h('dt', {}, 'Topic'), h('dd', {}, d.topic), h('dt', {}, 'Request'), h('dd', { class: 'mono' }, d.request_id),
          h('dt', {}, 'Dead since'), h('dd', {}, when(d.time)), h('dt', {}, 'Tries'), h('dd', {}, String(d.attempts)),
          h('dt', {}, 'Body'), h('dd', {}, d.body_bytes + ' bytes' + (d.body_truncated ? ' (preview of the first 4 KiB)' : ''))),
        h('h3', {}, 'Headers'),
        h('table', { id: 'letter-headers' }, h('tbody', {}, Object.entries(d.headers || {}).map(([k, v]) =>
          h('tr', {}, h('td', { class: 'mono' }, k), h('td', { class: 'mono' }, v))))),
        h('h3', {}, 'Body'),
        h('pre', { class: 'block light', id: 'letter-body' }, d.body_preview));
    };

    redriveAll.addEventListener('click', async () => {
      redriveAll.disabled = true;
      try {
        const answer = await post('/dead-letters/redrive');
        toast('Redriven: ' + answer.redriven.length + (answer.errors.length ? '; not redriven: ' + answer.errors.length : ''), answer.errors.length > 0);
      } catch (error) {
        if (!(error instanceof NeedToken)) toast('Redrive failed: ' + error.message, true);
      }
      await load();
    });

    purge.addEventListener('click', () => {
      const through = Math.max(...state.letters.map((d) => d.seq));
      const yes = h('button', { type: 'button', class: 'danger', id: 'purge-yes' }, 'Purge ' + state.letters.length + ' dead letter(s)');
      const no = h('button', { type: 'button', id: 'purge-no' }, 'Keep them');
      confirmBox.replaceChildren(h('span', {}, 'Remove these ' + state.letters.length +
        ' dead letter(s) for good? They cannot be redriven afterwards. Letters that arrive meanwhile are kept.'), yes, no);
      confirmBox.hidden = false;
      no.addEventListener('click', () => { confirmBox.hidden = true; });
      yes.addEventListener('click', async () => {
        yes.disabled = true;
        try {
          const answer = await post('/dead-letters/purge?through=' + through);
          toast('Purged ' + answer.purged + ' dead letter(s)');
        } catch (error) {
          if (!(error instanceof NeedToken)) toast('Purge failed: ' + error.message, true);
        }
        confirmBox.hidden = true;
        await load();
      });
    });

    await load();
    every(DEAD_EVERY_MS, load);
  }

  route();
})();
