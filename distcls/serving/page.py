"""The page's rollout section (an endpoint with variants or shadows): GET /v1/rollout as two tables, refreshed
every 2 seconds, inserted before the page's </body>. It uses the page's own `base`, `headers()` (the API
token field) and `escapeHtml`. No Ray.
"""

ROLLOUT_SECTION = """
<section id="rollout">
<h2 style="font-size:1.05rem">Rollout</h2>
<p id="rollout-weights"></p>
<table id="rollout-variants" style="font-size:.85rem;border-collapse:collapse"></table>
<table id="rollout-comparison" style="font-size:.85rem;border-collapse:collapse;margin-top:.75rem"></table>
</section>
<script>
function rolloutRow(cells, head) {
  const tag = head ? "th" : "td";
  const cell = (c) => `<${tag} style="padding:.15rem .5rem;text-align:left">${escapeHtml(c)}</${tag}>`;
  return "<tr>" + cells.map(cell).join("") + "</tr>";
}
function topLabels(labels) {
  return Object.entries(labels).slice(0, 3).map(([k, n]) => `${k} ${n}`).join(", ");
}
async function loadRollout() {
  try {
    const r = await fetch(base + "/v1/rollout", { headers: headers() });
    if (!r.ok) {
      const why = r.status === 401 ? "enter the API token to see the rollout" : "rollout: HTTP " + r.status;
      $("rollout-weights").textContent = why;
      return;
    }
    const s = await r.json();
    $("rollout-weights").textContent = "weights: " + Object.entries(s.weights || {}).map(([k, w]) => `${k} ${w}`).join(", ") +
      (s.shadows && s.shadows.length ? "; shadows: " + s.shadows.join(", ") + ` (fraction ${s.shadow_fraction})` : "");
    let rows = rolloutRow(["variant", "role", "requests", "errors", "p50 ms", "p99 ms", "mean score", "top labels"], true);
    for (const [name, v] of Object.entries(s.variants)) {
      const ms = [v.p50_ms ?? "-", v.p99_ms ?? "-"];
      rows += rolloutRow([name, v.role, v.requests, v.errors, ...ms, v.mean_score ?? "-", topLabels(v.labels)]);
    }
    $("rollout-variants").innerHTML = rows;
    const heads = ["vs " + s.primary, "mirrored images", "agreement", "score delta", "top disagreements", "dropped", "errors"];
    rows = rolloutRow(heads, true);
    for (const [name, c] of Object.entries(s.comparison)) {
      const pairs = c.top_disagreements.map((d) => `${d.primary}->${d.variant} ${d.count}`).join(", ");
      const figures = [c.images, c.agreement ?? "-", c.mean_score_delta ?? "-"];
      rows += rolloutRow([name, ...figures, pairs, c.mirrors_dropped, c.mirror_errors]);
    }
    $("rollout-comparison").innerHTML = rows;
  } catch (e) { $("rollout-weights").textContent = "rollout information unavailable"; }
}
loadRollout();
setInterval(loadRollout, 2000);
</script>
"""


def with_rollout(page: str) -> str:
    """The page with the rollout section before its closing </body>."""
    head, sep, tail = page.rpartition("</body>")
    return head + ROLLOUT_SECTION + sep + tail if sep else page + ROLLOUT_SECTION
