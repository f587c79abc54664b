// The official Feathers clients against a celery-services gateway, driven by tests/test_feathers_clients.py.
//
//   node client.mjs <scenario> '<json options>'
//
// Every line printed is one JSON object: {"step": name, "ok": result} or {"step": name, "error": {...}}, the
// error as the client rebuilt it (its class, name, code, className, data, errors). Scenarios:
//   methods  {url, transport: "rest" | "socketio", token?, tag}  every standard and custom method, query
//            operators and typed errors through the client's service object
//   auth     {url, token}                                         app.authenticate({strategy: "jwt", ...})
//   listen   {url, token?, count, timeout}                        prints {"step": "ready"}, then each event
//            of the articles service as {"step": "event", "event", "data"} until `count` or `timeout` ms
import { feathers } from '@feathersjs/feathers'
import rest from '@feathersjs/rest-client'
import socketio from '@feathersjs/socketio-client'
import authentication from '@feathersjs/authentication-client'
import { io } from 'socket.io-client'

const [scenario, raw] = process.argv.slice(2)
const options = JSON.parse(raw || '{}')
const print = (line) => process.stdout.write(JSON.stringify(line) + '\n')

function describe(error) {
  return {
    class: error?.constructor?.name,
    name: error?.name,
    message: error?.message,
    code: error?.code,
    className: error?.className,
    data: error?.data,
    errors: error?.errors
  }
}

async function step(name, run) {
  try {
    print({ step: name, ok: await run() })
  } catch (error) {
    print({ step: name, error: describe(error) })
  }
}

function client(transport, token) {
  const app = feathers()
  let socket = null
  if (transport === 'socketio') {
    socket = io(options.url, { transports: ['websocket'], reconnection: false, timeout: 5000 })
    app.configure(socketio(socket, { timeout: 8000 }))
  } else {
    const headers = token ? { Authorization: `Bearer ${token}` } : {}
    app.configure(rest(options.url).fetch(fetch, { headers }))
  }
  const store = new Map()
  const storage = {
    getItem: (key) => store.get(key),
    setItem: (key, value) => store.set(key, value),
    removeItem: (key) => store.delete(key)
  }
  app.configure(authentication({ storage }))
  const close = () => socket && socket.close()
  return { app, close }
}

function articlesOf(app) {
  const articles = app.service('articles')
  // Custom methods are declared on the client, as Feathers' own clients require.
  if (typeof articles.methods === 'function') articles.methods('publish_article')
  return articles
}

async function methods() {
  const { app, close } = client(options.transport, options.token)
  if (options.transport === 'socketio' && options.token) {
    await step('authenticate', () => app.authenticate({ strategy: 'jwt', accessToken: options.token }))
  }
  const articles = articlesOf(app)
  const tag = options.tag
  let id = null
  await step('create', async () => {
    const created = await articles.create({ title: `${tag}-1`, tag })
    id = created.id
    return created
  })
  await step('create-2', () => articles.create({ title: `${tag}-2`, tag }))
  await step('get', () => articles.get(id))
  await step('find', () => articles.find({ query: { tag, $limit: 1 } }))
  await step('find-in', () => articles.find({ query: { title: { $in: [`${tag}-1`, `${tag}-2`] } } }))
  await step('patch', () => articles.patch(id, { draft: true }))
  await step('update', () => articles.update(id, { title: `${tag}-1b`, tag }))
  await step('publish_article', () => articles.publish_article({ id }))
  await step('remove', () => articles.remove(id))
  await step('not-found', () => articles.get(id))
  await step('bad-request', () => articles.find({ query: { title: { $regex: 'x' } } }))
  await step('unknown-service', () => app.service('nothing-here').get(1))
  close()
}

async function auth() {
  const { app, close } = client('socketio')
  await step('authenticate', () => app.authenticate({ strategy: 'jwt', accessToken: options.token }))
  close()
}

async function listen() {
  const { app, close } = client('socketio')
  if (options.token) {
    await step('authenticate', () => app.authenticate({ strategy: 'jwt', accessToken: options.token }))
  }
  const articles = articlesOf(app)
  let seen = 0
  const done = new Promise((resolve) => {
    const timer = setTimeout(resolve, options.timeout || 10000)
    for (const event of ['created', 'patched', 'updated', 'removed', 'article_published']) {
      articles.on(event, (data) => {
        print({ step: 'event', event, data })
        seen += 1
        if (seen >= (options.count || Infinity)) {
          clearTimeout(timer)
          resolve()
        }
      })
    }
  })
  // A round trip on the socket first: listeners are registered once the connection answers.
  await step('ready', async () => {
    await articles.find({ query: { $limit: 0 } }).catch(() => null)
    return true
  })
  await done
  print({ step: 'end', ok: seen })
  close()
}

const scenarios = { methods, auth, listen }
if (!scenarios[scenario]) {
  print({ step: 'usage', error: { message: `unknown scenario ${scenario}` } })
  process.exit(2)
}
await scenarios[scenario]()
