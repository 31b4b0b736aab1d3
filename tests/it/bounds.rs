//! State bounded in bytes: queued bytes per session, retained bytes, will delay, write buffers, the memory budget; repeated SUBSCRIBEs (issue 13, items 3 and 5).
