// One sweep: its stages' progress, the cross-validation table and curves, the report's figures,
// a page of trials, and one trial's live curves, checkpoints, artifacts and log tail. Changes
// arrive as server-sent events for this sweep only; each updates just what it concerns.

import { api, badge, debounce, duration, el, fill, num, qs, session, time } from './dom.js';
import { LineChart } from './chart.js';

const PAGE = 50;
/** Curves drawn together in a trial's charts, by metric name. */
const GROUPS = [
  ['loss', ['train_loss', 'train_mse', 'val_mse', 'test_mse', 'loss']],
  ['accuracy', ['train_accuracy', 'val_accuracy', 'test_accuracy']],
  ['WGAN-GP', ['critic_loss', 'generator_loss', 'wasserstein', 'gradient_penalty']],
];
const IMAGE_ARTIFACT = /^(samples-e\d+|reconstructions-e\d+|real|latents)$/;

function metricGroups(epochs) {
  const names = new Set();
  for (const e of epochs) for (const key of Object.keys(e.values)) names.add(key);
  const groups = [];
  const used = new Set();
  for (const [title, members] of GROUPS) {
    const present = members.filter((m) => names.has(m));
    present.forEach((m) => used.add(m));
    if (present.length > 0) groups.push([title, present]);
  }
  for (const name of [...names].sort()) if (!used.has(name)) groups.push([name, [name]]);
  return groups;
}

export function renderSweep(main, sweepId) {
  const view = { page: 0, stage: '', selected: null, followFirstRunning: true, trial: null, lastLogId: 0, ended: false };
  const header = el('div', { id: 'sweep-header' });
  const stages = el('div', { class: 'card', id: 'stages' });
  const cv = el('div', { id: 'cv' });
  const figures = el('div', { id: 'figures' });
  const trialsBody = el('tbody', { id: 'trials-body' });
  const pager = el('div', { class: 'pager' });
  const stageSelect = el('select', { id: 'trial-stage' }, el('option', { value: '' }, 'every stage'));
  stageSelect.addEventListener('change', () => { view.stage = stageSelect.value; view.page = 0; loadTrials(); });
  const trialPanel = el('div', { id: 'trial' });
  fill(main, header, stages, cv, figures,
    el('h2', {}, 'Trials ', stageSelect),
    el('table', { id: 'trials' }, el('thead', {}, el('tr', {}, ['Trial', 'Config', 'Fold', 'State', 'Epochs', 'Latest', 'Worker'].map((h) => el('th', {}, h)))), trialsBody),
    pager, trialPanel);

  const configChart = new LineChart('Mean validation MSE per config (band: ± 1 std over folds)');
  const trialCharts = new Map();

  async function act(action) {
    const message = document.getElementById('action-message');
    try {
      const answer = await api(`/api/sweeps/${encodeURIComponent(sweepId)}/${action}`, { method: 'POST' });
      message.textContent = action === 'cancel' ? `${answer.cancelled} trials cancelled` : `${answer.requeued} trials queued again`;
      message.className = 'muted';
    } catch (error) {
      message.textContent = error.message;
      message.className = 'error';
    }
  }

  async function loadSweep() {
    const sweep = await api(`/api/sweeps/${encodeURIComponent(sweepId)}`);
    if (view.left) return sweep;
    view.ended = sweep.state !== 'running';
    const canAct = session.role === 'client';
    fill(header,
      el('h1', { id: 'sweep-name' }, sweep.name),
      el('div', { class: 'meta' }, el('span', {}, sweep.id), badge(sweep.state), el('span', {}, `created ${time(sweep.created_ms)}`), el('span', {}, `duration ${duration(sweep.duration_s)}`)),
      el('div', { class: 'actions' },
        el('button', { id: 'cancel', disabled: !canAct || sweep.state !== 'running', title: canAct ? '' : 'sign in with the client token to act', onclick: () => act('cancel') }, 'Cancel'),
        el('button', { id: 'retry', class: 'secondary', disabled: !canAct || sweep.state === 'running' || sweep.state === 'succeeded', onclick: () => act('retry') }, 'Retry'),
        el('span', { id: 'action-message' })));
    fill(stages, el('h2', {}, 'Stages'), sweep.stages.map((stage) => el('div', { class: 'stage', 'data-stage': stage.stage },
      el('span', { class: 'name' }, stage.stage),
      el('progress', { max: stage.total || 1, value: stage.ended }),
      el('span', {}, `${stage.ended}/${stage.total} ended · ${stage.counts.running} running · ${stage.counts.failed} failed`),
      el('span', { class: 'muted' }, stage.eta_s ? `about ${duration(stage.eta_s)} left` : ''))));
    const known = new Set([...stageSelect.options].map((o) => o.value));
    for (const stage of sweep.stages) if (!known.has(stage.stage)) stageSelect.append(el('option', { value: stage.stage }, stage.stage));
    return sweep;
  }

  async function loadCv() {
    const table = await api(`/api/sweeps/${encodeURIComponent(sweepId)}/cv`);
    if (table.configs.length === 0) { fill(cv); return; }
    const folds = [...Array(table.folds).keys()];
    const rows = table.configs.map((c) => el('tr', { class: c.winner ? 'winner' : '', 'data-config': c.config },
      el('td', {}, c.winner ? '★ ' : '', c.config),
      folds.map((f) => el('td', { class: 'num fold' }, num(c.folds[f]))),
      el('td', { class: 'num' }, c.mean === null ? '–' : `${num(c.mean)} ± ${num(c.std)}`)));
    fill(cv, el('h2', {}, 'Cross-validation'),
      el('table', { id: 'cv-table' }, el('thead', {}, el('tr', {}, el('th', {}, 'Config'), folds.map((f) => el('th', { class: 'num' }, `fold ${f} min`)), el('th', { class: 'num' }, 'mean ± std'))), el('tbody', {}, rows)),
      el('p', { id: 'cv-explanation' }, table.explanation ? `Winner: ${table.explanation}.` : 'No winner yet: a config wins once all its folds have finished.',
        table.total > table.configs.length ? ` Showing the ${table.configs.length} configs with the lowest means of ${table.total.toLocaleString()}.` : ''),
      el('div', { class: 'charts' }, configChart.node));
    const curves = await api(`/api/sweeps/${encodeURIComponent(sweepId)}/curves`);
    const metric = curves.metric === 'val_mse' ? 'validation MSE' : curves.metric;
    configChart.node.querySelector('.title').textContent = `Mean ${metric} per config (band: ± 1 std over folds)`;
    configChart.draw(curves.configs.map((c) => ({
      name: c.config,
      points: c.points.map((p) => [p.epoch, p.mean]),
      band: c.points.map((p) => [p.epoch, p.low, p.high]),
    })));
  }

  async function loadFigures() {
    const answer = await api(`/api/sweeps/${encodeURIComponent(sweepId)}/figures`);
    if (answer.figures.length === 0) { fill(figures); return; }
    fill(figures, el('h2', {}, 'Figures'), el('div', { class: 'figures' }, answer.figures.map((f) => el('figure', {},
      el('img', { src: `/api/sweeps/${encodeURIComponent(sweepId)}/figures/${encodeURIComponent(f.file)}`, alt: f.caption }),
      el('figcaption', {}, f.caption)))));
  }

  function latest(trial) {
    const preferred = ['val_mse', 'test_mse', 'test_accuracy', 'wasserstein', 'train_loss'];
    const key = preferred.find((k) => k in trial.last) || Object.keys(trial.last)[0];
    return key ? `${key} ${num(trial.last[key])}` : '–';
  }

  function trialRow(trial) {
    const row = el('tr', { class: `clickable${view.selected === trial.id ? ' selected' : ''}`, 'data-trial': trial.id },
      el('td', {}, trial.name), el('td', {}, trial.config), el('td', { class: 'num' }, trial.fold ?? '–'),
      el('td', { class: 'state' }, badge(trial.state), trial.waiting ? el('div', { class: 'muted waiting' }, trial.waiting) : null),
      el('td', { class: 'num epochs' }, `${trial.epochs}/${trial.planned_epochs}`),
      el('td', { class: 'latest' }, latest(trial)),
      el('td', {}, trial.workers.join(', ') || '–'));
    row.addEventListener('click', () => { view.followFirstRunning = false; selectTrial(trial.id); });
    return row;
  }

  async function loadTrials() {
    const page = await api(`/api/sweeps/${encodeURIComponent(sweepId)}/trials${qs({ stage: view.stage, offset: view.page * PAGE, limit: PAGE })}`);
    view.rows = new Map(page.trials.map((t) => [t.id, t]));
    fill(trialsBody, page.trials.map(trialRow));
    fill(pager,
      el('button', { class: 'secondary', disabled: view.page === 0, onclick: () => { view.page -= 1; loadTrials(); } }, 'Previous'),
      el('span', { class: 'muted' }, `${page.total === 0 ? 0 : view.page * PAGE + 1}–${Math.min((view.page + 1) * PAGE, page.total)} of ${page.total.toLocaleString()}`),
      el('button', { class: 'secondary', disabled: (view.page + 1) * PAGE >= page.total, onclick: () => { view.page += 1; loadTrials(); } }, 'Next'));
    if (view.followFirstRunning) {
      const running = page.trials.find((t) => t.state === 'running') || (view.selected ? null : page.trials[0]);
      if (running && running.id !== view.selected) selectTrial(running.id);
    }
  }

  function drawTrialCharts() {
    const trial = view.trial;
    const container = document.getElementById('trial-charts');
    if (view.left || !trial || !container) return;
    for (const [title, members] of metricGroups(trial.epochs)) {
      let chart = trialCharts.get(title);
      if (!chart) {
        chart = new LineChart(title);
        trialCharts.set(title, chart);
        container.append(chart.node);
      }
      chart.draw(members.map((m) => ({ name: m, points: trial.epochs.filter((e) => m in e.values).map((e) => [e.epoch, e.values[m]]) })));
    }
  }

  function drawTrialFiles() {
    const trial = view.trial;
    if (view.left || !trial || !document.getElementById('trial-checkpoints')) return;
    const name = (trial.name || trial.id).replaceAll('/', '-');
    fill(document.getElementById('trial-checkpoints'), trial.checkpoints.length === 0 ? el('p', { class: 'muted' }, 'No checkpoint yet.') :
      el('ul', {}, trial.checkpoints.map((c) => el('li', {},
        el('a', { href: `/api/blobs/${c.sha256}${qs({ name: `${name}-e${c.epoch}.safetensors` })}`, download: '' }, `epoch ${c.epoch}${c.final ? ' (final)' : ''}`),
        ` ${(c.size / 1024).toFixed(0)} KiB`))));
    const images = trial.artifacts.filter((a) => IMAGE_ARTIFACT.test(a.name));
    fill(document.getElementById('trial-artifacts'), images.length === 0 ? null : el('div', { class: 'figures' }, images.map((a) => el('figure', {},
      el('img', { src: `/api/trials/${encodeURIComponent(trial.id)}/artifacts/${encodeURIComponent(a.name)}.png`, alt: a.name }),
      el('figcaption', {}, el('a', { href: `/api/blobs/${a.sha256}${qs({ name: `${name}-${a.name}.safetensors` })}`, download: '' }, a.name))))));
  }

  async function selectTrial(taskId) {
    view.selected = taskId;
    for (const row of trialsBody.children) row.classList.toggle('selected', row.dataset.trial === taskId);
    const trial = await api(`/api/trials/${encodeURIComponent(taskId)}`);
    if (view.left || view.selected !== taskId) return;
    view.trial = trial;
    view.lastLogId = 0;
    trialCharts.clear();
    fill(trialPanel,
      el('h2', {}, 'Trial ', el('span', { id: 'trial-name' }, trial.name), ' ', badge(trial.state)),
      el('div', { class: 'meta' }, el('span', {}, trial.id), el('span', {}, `config ${trial.config}`), el('span', {}, `attempt ${trial.attempt}/${trial.max_attempts}`),
        trial.error ? el('span', { class: 'error' }, trial.error) : null),
      el('div', { class: 'charts', id: 'trial-charts' }),
      el('h2', {}, 'Checkpoints'), el('div', { id: 'trial-checkpoints' }),
      el('div', { id: 'trial-artifacts' }),
      el('h2', {}, 'Log'), el('pre', { class: 'log', id: 'trial-log' }));
    drawTrialCharts();
    drawTrialFiles();
    await loadLogs(true);
  }

  async function loadLogs(tail) {
    if (!view.trial) return;
    const taskId = view.trial.id;
    const answer = await api(`/api/trials/${encodeURIComponent(taskId)}/logs${qs(tail ? { limit: 200 } : { after: view.lastLogId })}`);
    if (!view.trial || view.trial.id !== taskId) return;
    const log = document.getElementById('trial-log');
    if (view.left || !log) return;
    const follow = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
    for (const line of answer.lines) {
      log.append(`${new Date(line.unix_ms).toLocaleTimeString()} ${line.level} ${line.message}\n`);
      view.lastLogId = Math.max(view.lastLogId, line.id);
    }
    while (log.childNodes.length > 2000) log.firstChild.remove();
    if (follow) log.scrollTop = log.scrollHeight;
  }

  async function refreshTrialFiles(taskId) {
    const trial = await api(`/api/trials/${encodeURIComponent(taskId)}`);
    if (!view.trial || view.trial.id !== taskId) return;
    view.trial = trial;
    drawTrialFiles();
  }

  function onEpochs(change) {
    const row = view.rows && view.rows.get(change.task_id);
    if (row) {
      for (const epoch of change.epochs) {
        row.epochs = Math.max(row.epochs, epoch.epoch);
        row.last = epoch.values.reduce((acc, [k, v]) => ({ ...acc, [k]: v }), {});
      }
      const node = trialsBody.querySelector(`tr[data-trial="${CSS.escape(change.task_id)}"]`);
      if (node) node.replaceWith(trialRow(row));
    }
    if (view.trial && view.trial.id === change.task_id) {
      for (const epoch of change.epochs) {
        const values = Object.fromEntries(epoch.values);
        view.trial.epochs = view.trial.epochs.filter((e) => e.epoch !== epoch.epoch).concat([{ epoch: epoch.epoch, values, seconds: epoch.seconds }]);
      }
      view.trial.epochs.sort((a, b) => a.epoch - b.epoch);
      drawTrialCharts();
    }
    refreshCurves();
  }

  // Stage counts and the trials page follow state changes within a second; the cross-validation
  // table, the curves and the figures (heavier on big sweeps) at most every few seconds.
  const refreshCurves = debounce(3000, () => { loadCv(); loadFigures(); });
  const refreshSweep = debounce(500, () => { loadSweep(); loadTrials(); refreshCurves(); });
  const events = new EventSource(`/api/events${qs({ sweep: sweepId })}`);
  events.addEventListener('epochs', (event) => onEpochs(JSON.parse(event.data)));
  events.addEventListener('state', refreshSweep);
  events.addEventListener('lagged', refreshSweep);
  events.addEventListener('logs', (event) => {
    const change = JSON.parse(event.data);
    if (view.trial && view.trial.id === change.task_id) loadLogs(false);
  });
  events.addEventListener('files', (event) => {
    const change = JSON.parse(event.data);
    if (view.trial && view.trial.id === change.task_id) refreshTrialFiles(change.task_id);
    refreshCurves();
  });

  loadSweep().then(() => Promise.all([loadTrials(), loadCv(), loadFigures()]));
  return () => { view.left = true; events.close(); };
}
