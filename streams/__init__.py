"""The Faust app: topics, agents, the outbox, timers and the embedded broker."""
