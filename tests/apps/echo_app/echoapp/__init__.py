"""Echo app: the smallest real Flower app, used to prove fedshield's process plumbing."""
