//! Slow and abusive clients: idle and packet timeouts, publish rate limits, connect rate limits (issue 13, item 4).
