// leafgate dashboard: the only script. Everything works without it; it adds a Copy button
// to the page that shows a one-time secret. No inline script anywhere (CSP script-src 'self').
'use strict';
document.addEventListener('DOMContentLoaded', () => {
  for (const button of document.querySelectorAll('button[data-copy]')) {
    const target = document.getElementById(button.getAttribute('data-copy'));
    if (!target || !navigator.clipboard) continue;
    button.hidden = false;
    button.addEventListener('click', () => {
      navigator.clipboard.writeText(target.textContent).then(() => { button.textContent = 'Copied'; }, () => { button.textContent = 'Copy failed: select it'; });
    });
  }
});
