//! The admin API behind a token, Host and Origin checks (issue 13, item 6).
