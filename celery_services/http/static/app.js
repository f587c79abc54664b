// The articles page: lists GET {prefix}/articles and follows {prefix}/events live. Plain JS, no build step.
(() => {
  "use strict";

  const meta = document.querySelector('meta[name="api-prefix"]');
  const prefix = meta && meta.content !== "__API_PREFIX__" ? meta.content : "";
  const list = document.getElementById("articles");
  const empty = document.getElementById("empty");
  const status = document.getElementById("status");
  const form = document.getElementById("new-article");
  const title = document.getElementById("title");

  const articles = new Map(); // String(id) -> article
  let pending = null; // changes seen while a reload is in flight, replayed on its result

  function say(text, error = false) {
    status.textContent = text;
    status.classList.toggle("error", error);
  }

  function byId(a, b) {
    const x = a.id, y = b.id;
    if (typeof x === "number" && typeof y === "number") return x - y;
    return String(x).localeCompare(String(y));
  }

  function render() {
    const items = [...articles.values()].sort(byId);
    list.replaceChildren(...items.map((article) => {
      const item = document.createElement("li");
      item.dataset.id = String(article.id);
      const id = document.createElement("span");
      id.className = "id";
      id.textContent = `#${article.id}`;
      const text = document.createElement("span");
      text.className = "title";
      text.textContent = article.title ?? "(untitled)";
      item.append(id, text);
      if (article.published) {
        const badge = document.createElement("span");
        badge.className = "badge";
        badge.textContent = "published";
        item.append(badge);
      }
      return item;
    }));
    empty.hidden = items.length > 0;
  }

  function apply(change) {
    if (change.removed) articles.delete(String(change.article.id));
    else articles.set(String(change.article.id), change.article);
  }

  function change(article, removed = false) {
    if (!article || article.id === undefined) return;
    const entry = { article, removed };
    if (pending) pending.push(entry);
    apply(entry);
    render();
  }

  async function load() {
    pending = [];
    try {
      const response = await fetch(`${prefix}/articles`, { headers: { Accept: "application/json" } });
      const body = await response.json();
      if (!response.ok) throw new Error(body.message || response.statusText);
      const items = Array.isArray(body) ? body : body.data || [];
      articles.clear();
      items.forEach((article) => articles.set(String(article.id), article));
      pending.forEach(apply);
      render();
      return true;
    } catch (error) {
      say(`Could not load the articles: ${error.message}`, true);
      return false;
    } finally {
      pending = null;
    }
  }

  function follow() {
    const source = new EventSource(`${prefix}/events?path=articles`);
    source.addEventListener("open", async () => {
      // Loaded once the stream is open, so no change falls between the list and the live updates.
      if (await load()) say(`Live: ${articles.size} article(s)`);
    });
    const verbs = { created: "created", updated: "updated", patched: "updated", article_published: "published" };
    for (const [event, verb] of Object.entries(verbs)) {
      source.addEventListener(event, (message) => {
        const { data } = JSON.parse(message.data);
        change(data);
        say(`Live: article #${data.id} ${verb}`);
      });
    }
    source.addEventListener("removed", (message) => {
      const { data } = JSON.parse(message.data);
      change(data, true);
      say(`Live: article #${data.id} removed`);
    });
    source.addEventListener("dropped", async () => {
      if (await load()) say("Live: caught up after missing updates");
    });
    source.addEventListener("error", () => say("Live updates interrupted: reconnecting…", true));
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const value = title.value.trim();
    if (!value) return;
    try {
      const response = await fetch(`${prefix}/articles`, {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify({ title: value }),
      });
      const body = await response.json();
      if (!response.ok) throw new Error(body.message || response.statusText);
      change(body);
      title.value = "";
      say(`Article #${body.id} created`);
    } catch (error) {
      say(`Could not create the article: ${error.message}`, true);
    }
  });

  follow();
})();
