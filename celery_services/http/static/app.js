// The articles page, a Feathers socket client without Feathers: lists and creates the articles and follows
// their events over the gateway's Socket.IO transport (static/socket.io.min.js). Plain JS, no build step.
(() => {
  "use strict";

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

  // A gateway with authentication wants a JWT: open the page as /#access_token=<token>. The fragment never
  // reaches the server nor its logs; the token is kept for this tab only, and taken out of the address bar.
  const given = new URLSearchParams(location.hash.slice(1)).get("access_token");
  if (given) {
    sessionStorage.setItem("access_token", given);
    history.replaceState(null, "", location.pathname + location.search);
  }
  const token = sessionStorage.getItem("access_token");

  const socket = io({ transports: ["websocket", "polling"] });

  function authenticate() {
    if (!token) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const data = { strategy: "jwt", accessToken: token };
      socket.emit("create", "authentication", data, {}, (error) => (error ? reject(error) : resolve()));
    });
  }

  // Feathers' socket protocol: emit(method, path, ...args, callback(error, result)).
  function call(method, ...args) {
    return new Promise((resolve, reject) => {
      socket.emit(method, "articles", ...args, (error, result) => (error ? reject(error) : resolve(result)));
    });
  }

  async function load() {
    pending = [];
    try {
      await authenticate();
      const body = await call("find", {});
      const items = Array.isArray(body) ? body : body.data || [];
      articles.clear();
      items.forEach((article) => articles.set(String(article.id), article));
      pending.forEach(apply);
      render();
      return true;
    } catch (error) {
      const hint = error.code === 401 ? " (open this page as /#access_token=<your JWT>)" : "";
      say(`Could not load the articles: ${error.message}${hint}`, true);
      return false;
    } finally {
      pending = null;
    }
  }

  function follow() {
    socket.on("connect", async () => {
      // Loaded once connected (and again after a reconnection), so no change falls between the list and
      // the live updates.
      if (await load()) say(`Live: ${articles.size} article(s)`);
    });
    const verbs = { created: "created", updated: "updated", patched: "updated", article_published: "published" };
    for (const [event, verb] of Object.entries(verbs)) {
      socket.on(`articles ${event}`, (data) => {
        change(data);
        say(`Live: article #${data.id} ${verb}`);
      });
    }
    socket.on("articles removed", (data) => {
      change(data, true);
      say(`Live: article #${data.id} removed`);
    });
    socket.on("disconnect", () => say("Live updates interrupted: reconnecting…", true));
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const value = title.value.trim();
    if (!value) return;
    try {
      const body = await call("create", { title: value }, {});
      change(body);
      title.value = "";
      say(`Article #${body.id} created`);
    } catch (error) {
      say(`Could not create the article: ${error.message}`, true);
    }
  });

  follow();
})();
