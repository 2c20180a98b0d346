// Hive dashboard: the live parts. Rows, summaries and log lines arrive as HTML the server
// rendered and escaped; they are parsed in a <template> and put in place, nothing else.
(function () {
  'use strict';

  function parse(html) {
    var t = document.createElement('template');
    t.innerHTML = html;
    return t.content;
  }

  function status(text, on) {
    var s = document.getElementById('live');
    if (!s) return;
    s.textContent = text;
    s.classList.toggle('on', !!on);
  }

  // The builds list: rows replaced in place, new builds on top.
  var table = document.getElementById('builds');
  if (table && table.dataset.live && window.EventSource) {
    var tbody = table.tBodies[0];
    var es = new EventSource(table.dataset.live);
    es.onopen = function () { status('live', true); };
    es.onerror = function () { status('reconnecting…', false); };
    es.addEventListener('row', function (e) {
      var row = parse(e.data).firstElementChild;
      if (!row || !row.id) return;
      var old = document.getElementById(row.id);
      if (old) {
        old.replaceWith(row);
      } else {
        tbody.insertBefore(row, tbody.firstElementChild);
        var none = document.getElementById('no-builds');
        if (none) none.remove();
      }
    });
    es.addEventListener('gone', function (e) {
      var old = document.getElementById('b-' + e.data);
      if (old) old.remove();
    });
    es.addEventListener('resync', function () { es.close(); location.reload(); });
  }

  // A build page: its summary replaced, log lines appended, until the build ends.
  var log = document.getElementById('log');
  if (log && log.dataset.live && window.EventSource) {
    var bs = new EventSource(log.dataset.live);
    bs.onopen = function () { status('following', true); };
    bs.onerror = function () { status('reconnecting…', false); };
    bs.addEventListener('build', function (e) {
      var fresh = parse(e.data).firstElementChild;
      var old = document.getElementById('summary');
      if (fresh && old) old.replaceWith(fresh);
    });
    bs.addEventListener('log', function (e) {
      var el = document.scrollingElement || document.documentElement;
      var atBottom = el.scrollTop + window.innerHeight >= el.scrollHeight - 48;
      log.appendChild(parse(e.data));
      // Follow the end unless the reader scrolled up or opened a line's link.
      if (atBottom && !location.hash) window.scrollTo(0, el.scrollHeight);
    });
    bs.addEventListener('step', function (e) {
      document.dispatchEvent(new CustomEvent('hive-step', { detail: e.data }));
    });
    bs.addEventListener('end', function () { bs.close(); status('ended', false); });
  }
})();

// Running builds' durations count on between updates (server time: the page says its "now").
(function () {
  'use strict';
  var skew = (Number(document.body.dataset.now) || Date.now()) - Date.now();
  function fmt(ms) {
    if (ms < 1000) return Math.max(0, Math.floor(ms)) + 'ms';
    var s = Math.floor(ms / 1000);
    if (s < 60) return s + 's';
    if (s < 3600) return Math.floor(s / 60) + 'm ' + String(s % 60).padStart(2, '0') + 's';
    return Math.floor(s / 3600) + 'h ' + String(Math.floor(s % 3600 / 60)).padStart(2, '0') + 'm';
  }
  setInterval(function () {
    var now = Date.now() + skew;
    document.querySelectorAll('.duration[data-start]').forEach(function (el) {
      el.textContent = fmt(now - Number(el.dataset.start));
    });
  }, 1000);
})();

// Where each step's output starts, as the live log reaches it.
(function () {
  'use strict';
  var log = document.getElementById('log');
  if (!log) return;
  document.addEventListener('hive-step', function (e) {
    var parts = String(e.detail).split(':');
    var n = parseInt(parts[0], 10), line = parseInt(parts[1], 10);
    if (!(n >= 1) || !(line >= 1)) return;
    var li = document.getElementById('step-' + n);
    if (!li) return;
    var a = li.querySelector('a.steplink');
    if (!a) {
      li.appendChild(document.createTextNode(' '));
      a = document.createElement('a');
      a.className = 'steplink';
      li.appendChild(a);
    }
    a.setAttribute('href', '#L' + line);
    a.textContent = 'output from line ' + line;
  });
})();
