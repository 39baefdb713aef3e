// A standard js-libp2p 2.x peer (TCP, noise, yamux, identify, ping, gossipsub, the default
// connection manager and connection monitor) that dials a p2plive element, subscribes to a
// topic and stays for a while. Used by tests/interop.rs.
//
//   node peer.mjs <multiaddr ending in /p2p/<id>> --topic <gossipsub topic> [--seconds N] [--no-ping]
//
// --no-ping leaves the ping service out (the connection monitor still pings the other side).
// The last line on stdout is a JSON summary: connections to the dialled peer opened and
// closed before the end, and messages received on the topic.

// js-libp2p 2.10's dependencies call Promise.withResolvers (Node.js >= 22); Node.js 20 and
// Debian's 18 lack it.
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function () {
    let resolve, reject
    const promise = new this((res, rej) => { resolve = res; reject = rej })
    return { promise, resolve, reject }
  }
}

const { createLibp2p } = await import('libp2p')
const { tcp } = await import('@libp2p/tcp')
const { noise } = await import('@chainsafe/libp2p-noise')
const { yamux } = await import('@chainsafe/libp2p-yamux')
const { identify } = await import('@libp2p/identify')
const { ping } = await import('@libp2p/ping')
const { gossipsub } = await import('@chainsafe/libp2p-gossipsub')
const { multiaddr } = await import('@multiformats/multiaddr')

const args = process.argv.slice(2)
const option = (name, fallback) => {
  const i = args.indexOf(name)
  return i >= 0 ? args[i + 1] : fallback
}
const target = multiaddr(args.find(a => a.startsWith('/')))
const topic = option('--topic', '/p2plive/1/p2plive/control')
const seconds = Number(option('--seconds', '40'))
const withPing = !args.includes('--no-ping')
const remote = target.getPeerId()

const services = { identify: identify(), pubsub: gossipsub({ allowPublishToZeroTopicPeers: true }) }
if (withPing) services.ping = ping()
const node = await createLibp2p({
  transports: [tcp()],
  connectionEncrypters: [noise()],
  streamMuxers: [yamux()],
  services
})

const start = Date.now()
const summary = { ping: withPing, opened: 0, closed: 0, messages: 0, closes_at_ms: [] }
node.addEventListener('connection:open', e => {
  if (e.detail.remotePeer.toString() === remote) summary.opened++
})
node.addEventListener('connection:close', e => {
  if (e.detail.remotePeer.toString() === remote) {
    summary.closed++
    summary.closes_at_ms.push(Date.now() - start)
  }
})
node.services.pubsub.addEventListener('message', e => {
  if (e.detail.topic === topic) summary.messages++
})
node.services.pubsub.subscribe(topic)
try {
  await node.dial(target)
} catch (err) {
  summary.dial_error = String(err)
}
await new Promise(resolve => setTimeout(resolve, seconds * 1000))
summary.connected_at_end = node.getConnections()
  .filter(c => c.remotePeer.toString() === remote).length
console.log(JSON.stringify(summary))
await node.stop()
process.exit(0)
