// Server-sent events read with fetch (not EventSource), so that a 4xx answer (busy, bad slider or value) shows its
// message in the page. Each event named in `lanes` appends its text to #lane-<event>; "end" and "error" go to
// `status`. Shared by the equalizer and the graph page.
async function streamLanes(url, lanes, status) {
  const resp = await fetch(url, { headers: { accept: "text/event-stream" } });
  if (!resp.ok) {
    const body = await resp.json().catch(() => ({ error: resp.statusText }));
    status.textContent = `${resp.status}: ${body.error}`;
    return;
  }
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += value;
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const event = (block.match(/^event: (.*)$/m) || [])[1];
      const data = JSON.parse((block.match(/^data: (.*)$/m) || [, "{}"])[1]);
      if (lanes.includes(event)) document.querySelector(`#lane-${event}`).textContent += data.text;
      else if (event === "end") status.textContent = `done in ${data.seconds} s`;
      else if (event === "error") status.textContent = data.message;
    }
  }
}
window.streamLanes = streamLanes;
