"""The engine: one driver and one loop for every AMQP connection of a process.

- `transport.py`: the thin network layer (DNS, non-blocking connect, TLS, send/recv).
- `connection.py`: the socket-free protocol (magne.amqp.protocol) on a transport.
- `waker.py`: the one way a thread wakes another that waits on a selector.
- `loop.py`: the one loop: a thread, a selector, timers, a waker, the connections it drives.
- `reconnect.py`: the one reconnect policy (nodes of a cluster, backoff).
- `sender.py`: confirmed publishing (declarations on their own channel, the confirm tracker);
  `message.py`: a message on its way and the declarations it needs.
- `session.py`: a client's channel for calls, gets and consumers (re-subscribed after a reconnect).
- `client.py`: an application's connection on its own loop: publish, call, get, consume.
"""
