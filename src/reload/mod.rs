//! Hot reload: SIGHUP and `POST /api/v1/reload` read the config file again and swap the
//! rules, targets, sources, AMQP brokers, HTTP endpoints, bridges, users and the ACL at once.
//!
//! A reload is planned before anything changes: the file must parse and validate (else
//! `invalid`, with file:line:column), no key that only a restart applies may differ (else
//! `needs_restart` with the keys: `diff::restart_keys`, and the `spool:` bounds of a spool
//! that stays), and the new rule set must compile offline (no task, no connection). Only then
//! are the new systems started, reusing every running system, target, spool and source whose
//! config is the same (`diff`), and the new [`Live`] swapped into the [`LiveCell`] the
//! sessions read. Connections are woken to take the new ACL, those whose right to be
//! connected is gone are closed (`CloseReason::Revoked`). What the old config ran and the new
//! one does not is retired once no session routes with the old snapshot (or after
//! `shutdown_timeout`): bridges disconnect, removed spools stop and move what they hold to
//! the dead letters; AMQP connections and HTTP lanes end when their last handle is dropped.
//!
//! One reload at a time (a tokio mutex around the running state).

pub mod diff;
pub mod live;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use live::{Live, LiveCell};

use crate::auth::Authenticator;
use crate::broker::sessions::Owner;
use crate::broker::Broker;
use crate::config::{AckPolicy, Config};
use crate::deadletters::DeadLetters;
use crate::metrics::{HashLabels, Metrics, ResultLabels};
use crate::rules::RuleSet;
use crate::spool::{self, SpoolContext};
use crate::store::Store;
use crate::targets::kinds::{self, Reuse, StartContext, StartedContext, Systems};
use crate::targets::Target;

/// The config file a gateway was started from: read again by a reload.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    /// Its path as given.
    pub path: PathBuf,
    /// The sha256 of the bytes the running config was parsed from, hex.
    pub hash: String,
    /// Those bytes as YAML (for comparisons by value).
    tree: Value,
}

impl ConfigFile {
    /// Reads and parses `path`: the file, its hash and the config.
    pub fn load(path: &Path) -> Result<(ConfigFile, Config), crate::config::ConfigErrors> {
        let bytes = std::fs::read(path).map_err(|e| {
            crate::config::ConfigErrors(vec![crate::config::ConfigError {
                file: path.to_owned(),
                line: 0,
                column: 0,
                message: format!("cannot read the config file: {e}"),
            }])
        })?;
        let text = String::from_utf8_lossy(&bytes);
        let config = Config::parse(path, &text)?;
        let file = ConfigFile {
            path: path.to_owned(),
            hash: hash(&bytes),
            tree: diff::tree(&text).unwrap_or(Value::Null),
        };
        Ok((file, config))
    }
}

/// The sha256 of `bytes`, hex.
pub fn hash(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Swapped: the new file's hash and a summary of what changed.
    Ok { hash: String, changed: Value },
    /// The file does not parse or validate (`file:line:column: message` lines): nothing
    /// changed.
    Invalid { error: String },
    /// Keys only a restart applies differ: nothing changed.
    NeedsRestart { keys: Vec<String> },
    /// The new config could not be started (a system that cannot be built): nothing changed.
    Failed { error: String },
}

impl Outcome {
    /// The `result` label and JSON field.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Ok { .. } => "ok",
            Outcome::Invalid { .. } => "invalid",
            Outcome::NeedsRestart { .. } => "needs_restart",
            Outcome::Failed { .. } => "failed",
        }
    }

    /// The answer of `POST /api/v1/reload`: its status and body.
    pub fn to_json(&self) -> (u16, Value) {
        match self {
            Outcome::Ok { hash, changed } => {
                (200, json!({"result": "ok", "hash": hash, "changed": changed}))
            }
            Outcome::Invalid { error } => (400, json!({"result": "invalid", "error": error})),
            Outcome::NeedsRestart { keys } => {
                (409, json!({"result": "needs_restart", "keys": keys}))
            }
            Outcome::Failed { error } => (500, json!({"result": "failed", "error": error})),
        }
    }
}

/// What a gateway's routing state is built with, the same for every config.
#[derive(Clone)]
pub struct Base {
    /// Local subscribers, retained messages, the client-id registry.
    pub broker: Arc<Broker>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// The store, with `store:`.
    pub store: Option<Store>,
    /// The dead letters, with `store:`.
    pub dead_letters: Option<DeadLetters>,
    /// Cancelled once the sessions have finished: the sinks (and spools) stop after them.
    pub sinks_shutdown: CancellationToken,
    /// Cancelled at shutdown: sources stop.
    pub shutdown: CancellationToken,
}

/// What one config runs, kept to be compared with (and partly reused by) the next.
pub struct Running {
    /// The config.
    config: Config,
    /// Its file (hash, YAML tree), when started from one.
    file: Option<ConfigFile>,
    /// Every target kind's running systems.
    systems: Systems,
    /// The running sources, by name, with what stops each.
    sources: HashMap<String, CancellationToken>,
    /// The sources kept running from the previous config.
    kept_sources: BTreeSet<String>,
}

/// Builds what `config` runs: systems (reusing `previous`'s unchanged ones), the rule set
/// (reusing unchanged targets), spools, sources; the [`Live`] snapshot of generation
/// `generation`. At start `previous` is `None`.
pub async fn build(
    base: &Base,
    config: Config,
    file: Option<ConfigFile>,
    previous: Option<(&Running, &Live)>,
    generation: u64,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<(Running, Live)> {
    let auth = Arc::new(Authenticator::from_config(&config)?);
    let (old_tree, new_tree) = match (previous.and_then(|(r, _)| r.file.as_ref()), &file) {
        (Some(a), Some(b)) => (a.tree.clone(), b.tree.clone()),
        _ => (Value::Null, Value::Null),
    };
    let same = |section: &str, name: &str| -> bool {
        if !diff::same_entry(&old_tree, &new_tree, section, name) {
            return false;
        }
        // A bridge carries its `bridge:` sources' subscriptions: they must be the same too.
        section != "bridges" || bridge_sources(&old_tree, name) == bridge_sources(&new_tree, name)
    };
    let reuse = previous.map(|(r, _)| Reuse { systems: &r.systems, same: &same });
    let mut systems = Systems::default();
    let mut starting = StartContext {
        metrics: &base.metrics,
        shutdown: &base.sinks_shutdown,
        tasks,
        systems: &mut systems,
        connect: true,
        reuse: reuse.as_ref(),
    };
    kinds::start_systems(&config, &mut starting)?;
    let kept = |rule: &str, index: usize, id: &str| -> Option<Arc<dyn Target>> {
        let (_, live) = previous?;
        let (old_rule, target) = live.rules.target(id)?;
        let old_index = old_rule.targets.iter().position(|t| t.id() == id)?;
        let tc = config.rules.iter().find(|r| r.name.value == rule)?.to.get(index)?;
        let (section, system) = tc.system();
        let unchanged = old_rule.name == rule
            && diff::target(&old_tree, rule, old_index).is_some()
            && diff::target(&old_tree, rule, old_index) == diff::target(&new_tree, rule, index)
            && same(section, system);
        unchanged.then(|| Arc::clone(target))
    };
    let mut rules = RuleSet::compile_reusing(&config, &systems, &base.metrics, &kept)?;
    rules.start();
    if let Some(dl) = &base.dead_letters {
        rules.record_dead_letters(dl);
    }
    let rules = Arc::new(rules);
    let at = SpoolContext {
        store: base.store.as_ref(),
        dead_letters: base.dead_letters.as_ref(),
        metrics: &base.metrics,
        shutdown: &base.sinks_shutdown,
    };
    let spools =
        spool::start_reusing(&config, &rules, &at, previous.map(|(_, l)| &l.spools), tasks).await?;
    let mut sources = HashMap::new();
    let mut kept_sources = BTreeSet::new();
    for s in &config.sources {
        let name = &s.name.value;
        let unchanged = previous.is_some()
            && diff::source(&old_tree, name).is_some()
            && diff::source(&old_tree, name) == diff::source(&new_tree, name)
            && s.broker
                .as_ref()
                .is_none_or(|b| diff::same_entry(&old_tree, &new_tree, "amqp", &b.value))
            && s.amqp10
                .as_ref()
                .is_none_or(|b| diff::same_entry(&old_tree, &new_tree, "amqp10", &b.value));
        if let Some(token) = previous.filter(|_| unchanged).and_then(|(r, _)| r.sources.get(name)) {
            sources.insert(name.clone(), token.clone());
            kept_sources.insert(name.clone());
            continue;
        }
        let token = base.shutdown.child_token();
        let mut at = crate::sources::SourceContext {
            broker: &base.broker,
            metrics: &base.metrics,
            shutdown: &token,
            systems: &systems,
            tasks,
        };
        crate::sources::start_one(s, &config, &mut at);
        sources.insert(name.clone(), token);
    }
    let mut started = StartedContext {
        systems: &systems,
        tasks,
        broker: &base.broker,
        shutdown: &base.sinks_shutdown,
    };
    kinds::started(&config, &mut started);
    let live = Live {
        generation,
        rules,
        spools,
        auth,
        health: systems.health().to_vec(),
        hash: file.as_ref().map(|f| f.hash.clone()).unwrap_or_default(),
    };
    Ok((Running { config, file, systems, sources, kept_sources }, live))
}

/// The `sources:` entries riding on bridge `name`.
fn bridge_sources<'a>(t: &'a Value, name: &str) -> Vec<&'a Value> {
    let Some(list) = t.get("sources").and_then(Value::as_array) else { return Vec::new() };
    list.iter().filter(|s| s.get("bridge").and_then(Value::as_str) == Some(name)).collect()
}

/// The reload state: the running config and the tasks reloads started.
pub struct Reloader {
    base: Base,
    /// What sessions share: its login cache is cleared by a reload.
    gateway: Arc<crate::mqtt::session::SessionShared>,
    /// What sessions and the admin API read.
    live: Arc<LiveCell>,
    /// `shutdown_timeout`: the longest the old systems wait for sessions to let go of the
    /// old snapshot before they are retired anyway.
    grace: Duration,
    /// The running config; one reload at a time.
    state: tokio::sync::Mutex<State>,
}

struct State {
    running: Running,
    /// Tasks started by reloads (systems, spools, sources, retirements): joined at shutdown.
    tasks: JoinSet<()>,
}

impl Reloader {
    /// The reload state of a gateway started with `running`.
    pub fn new(
        base: Base,
        gateway: Arc<crate::mqtt::session::SessionShared>,
        running: Running,
        grace: Duration,
    ) -> Reloader {
        let live = Arc::clone(&gateway.live);
        if let Some(f) = &running.file {
            base.metrics.config_info.get_or_create(&HashLabels { hash: f.hash.clone() }).set(1);
        }
        Reloader {
            base,
            gateway,
            live,
            grace,
            state: tokio::sync::Mutex::new(State { running, tasks: JoinSet::new() }),
        }
    }

    /// The tasks reloads started (for the shutdown to join).
    pub async fn take_tasks(&self) -> JoinSet<()> {
        std::mem::take(&mut self.state.lock().await.tasks)
    }

    /// Reads the config file again and swaps what it configures (see the module docs).
    pub async fn reload(&self) -> Outcome {
        let outcome = self.reload_inner().await;
        let result = outcome.label();
        self.base.metrics.config_reloads.get_or_create(&ResultLabels { result }).inc();
        match &outcome {
            Outcome::Ok { hash, changed } => info!(%hash, %changed, "config reloaded"),
            Outcome::Invalid { error } => warn!(%error, "config reload refused: invalid file"),
            Outcome::NeedsRestart { keys } => {
                warn!(keys = %keys.join(", "), "config reload refused: these keys need a restart")
            }
            Outcome::Failed { error } => warn!(%error, "config reload failed; nothing changed"),
        }
        outcome
    }

    async fn reload_inner(&self) -> Outcome {
        let mut state = self.state.lock().await;
        if self.base.shutdown.is_cancelled() {
            return Outcome::Failed { error: "shutting down".into() };
        }
        let Some(old_file) = state.running.file.clone() else {
            return Outcome::Failed {
                error: "this gateway was not started from a config file".into(),
            };
        };
        let (file, config) = match ConfigFile::load(&old_file.path) {
            Ok(loaded) => loaded,
            Err(errors) => return Outcome::Invalid { error: errors.to_string() },
        };
        let mut keys = diff::restart_keys(&old_file.tree, &file.tree);
        keys.extend(spool_bounds_changed(
            &state.running.config,
            &config,
            &old_file.tree,
            &file.tree,
        ));
        if !keys.is_empty() {
            return Outcome::NeedsRestart { keys };
        }
        // Compiled offline first (no task, no connection): a config whose rules or systems
        // cannot be built changes nothing and leaves nothing behind.
        if let Err(e) = offline_check(&config) {
            return Outcome::Failed { error: format!("{e:#}") };
        }
        let old_live = self.live.load();
        let generation = old_live.generation + 1;
        let mut tasks = std::mem::take(&mut state.tasks);
        let built = build(
            &self.base,
            config,
            Some(file.clone()),
            Some((&state.running, &old_live)),
            generation,
            &mut tasks,
        )
        .await;
        state.tasks = tasks;
        let (running, live) = match built {
            Ok(b) => b,
            Err(e) => return Outcome::Failed { error: format!("{e:#}") },
        };
        let changed = summary(&state.running, &old_live, &running, &live);
        let new_auth = Arc::clone(&live.auth);
        let old_auth = Arc::clone(&old_live.auth);
        let old_live_swapped = self.live.store(live);
        drop(old_live);
        // Logins are checked against the new users from now, never a cached old check.
        self.gateway.logins.forget_verified();
        // Connected clients: those that would not be let in now are closed, the others take
        // the new ACL at once.
        let revoked = |client_id: &str, owner: &Owner| match owner {
            Owner::Anonymous => !new_auth.allows_anonymous(),
            Owner::User(u) => {
                (old_auth.has_user(u) && !new_auth.has_user(u))
                    || !new_auth.client_id_allowed(Some(u), client_id)
            }
            Owner::Unknown => false,
        };
        let disconnected = self.base.broker.reloaded(&revoked);
        let old = std::mem::replace(&mut state.running, running);
        let mut changed = changed;
        changed["disconnected"] = json!(disconnected);
        // Sources removed or changed stop now (a changed one was started anew).
        for (name, token) in &old.sources {
            if !state.running.kept_sources.contains(name) {
                token.cancel();
            }
        }
        let metrics = &self.base.metrics;
        if let Some(f) = &old.file {
            metrics.config_info.remove(&HashLabels { hash: f.hash.clone() });
        }
        metrics.config_info.get_or_create(&HashLabels { hash: file.hash.clone() }).set(1);
        // Retired once no session routes with the old snapshot (or after the grace).
        let new_spools = self.live.load().spools.clone();
        let removed: Vec<spool::Spool> = old_live_swapped
            .spools
            .iter()
            .filter(|s| new_spools.get(s.id()).is_none())
            .cloned()
            .collect();
        let (store, dead_letters) = (self.base.store.clone(), self.base.dead_letters.clone());
        let grace = self.grace;
        let kept_systems: BTreeSet<String> =
            state.running.systems.reused().map(str::to_owned).collect();
        state.tasks.spawn(async move {
            let deadline = tokio::time::Instant::now() + grace;
            while Arc::strong_count(&old_live_swapped) > 1 && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let kept =
                |section: &str, name: &str| kept_systems.contains(&format!("{section}.{name}"));
            kinds::retire(&old.systems, &kept);
            if let (Some(store), Some(dl)) = (store, dead_letters) {
                spool::retire(removed, &store, &dl).await;
            }
            drop(old_live_swapped);
            drop(old);
        });
        Outcome::Ok { hash: file.hash, changed }
    }
}

/// The `rules.NAME.spool` keys of spools that stay (same target id, still `ack: spool`)
/// whose bounds changed: they size a running spool, so only a restart applies them.
fn spool_bounds_changed(
    old: &Config,
    new: &Config,
    old_tree: &Value,
    new_tree: &Value,
) -> Vec<String> {
    let ids = |c: &Config| -> BTreeMap<String, String> {
        let mut ids = BTreeMap::new();
        for r in c.rules.iter().filter(|r| r.ack_policy() == AckPolicy::Spool) {
            for t in &r.to {
                ids.insert(kinds::target_id(&r.name.value, t), r.name.value.clone());
            }
        }
        ids
    };
    let (a, b) = (ids(old), ids(new));
    let mut keys = BTreeSet::new();
    for (id, new_rule) in &b {
        let Some(old_rule) = a.get(id) else { continue };
        let before = diff::rule(old_tree, old_rule).and_then(|r| r.get("spool"));
        let after = diff::rule(new_tree, new_rule).and_then(|r| r.get("spool"));
        if before != after {
            keys.insert(format!("rules.{new_rule}.spool"));
        }
    }
    keys.into_iter().collect()
}

/// Builds the new config's systems and rule set detached (no task, no connection), as the
/// route dry-run does: what cannot be built is found before anything starts.
fn offline_check(config: &Config) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let mut systems = Systems::default();
    let mut tasks = JoinSet::new();
    let shutdown = CancellationToken::new();
    let mut at = StartContext {
        metrics: &metrics,
        shutdown: &shutdown,
        tasks: &mut tasks,
        systems: &mut systems,
        connect: false,
        reuse: None,
    };
    kinds::start_systems(config, &mut at)?;
    RuleSet::compile(config, &systems, &metrics)?;
    Ok(())
}

/// What a reload changed, for its answer and its log line.
fn summary(old: &Running, old_live: &Live, new: &Running, new_live: &Live) -> Value {
    let names =
        |c: &Config| -> BTreeSet<String> { c.rules.iter().map(|r| r.name.value.clone()).collect() };
    let (a, b) = (names(&old.config), names(&new.config));
    let tree = |r: &Running| r.file.as_ref().map(|f| f.tree.clone()).unwrap_or(Value::Null);
    let (ta, tb) = (tree(old), tree(new));
    let changed_rules: Vec<&String> =
        a.intersection(&b).filter(|n| diff::rule(&ta, n) != diff::rule(&tb, n)).collect();
    let mut kept = 0usize;
    let mut built = 0usize;
    for rule in new_live.rules.rules() {
        for t in &rule.targets {
            let reused = old_live.rules.target(t.id()).is_some_and(|(_, old)| Arc::ptr_eq(old, t));
            if reused {
                kept += 1;
            } else {
                built += 1;
            }
        }
    }
    let systems =
        |r: &Running| -> BTreeSet<String> { kinds::system_names(&r.config).into_iter().collect() };
    let (sa, sb) = (systems(old), systems(new));
    let kept_systems: BTreeSet<String> = new.systems.reused().map(str::to_owned).collect();
    let users = |c: &Config| -> BTreeSet<String> {
        c.users.iter().map(|u| u.username.value.clone()).collect()
    };
    let (ua, ub) = (users(&old.config), users(&new.config));
    let sources = |c: &Config| -> BTreeSet<String> {
        c.sources.iter().map(|s| s.name.value.clone()).collect()
    };
    let (oa, ob) = (sources(&old.config), sources(&new.config));
    json!({
        "rules": {
            "added": b.difference(&a).collect::<Vec<_>>(),
            "removed": a.difference(&b).collect::<Vec<_>>(),
            "changed": changed_rules,
        },
        "targets": {"kept": kept, "built": built},
        "systems": {
            "kept": kept_systems.iter().collect::<Vec<_>>(),
            "started": sb.iter().filter(|s| !kept_systems.contains(*s)).collect::<Vec<_>>(),
            "removed": sa.difference(&sb).collect::<Vec<_>>(),
        },
        "sources": {
            "added": ob.difference(&oa).collect::<Vec<_>>(),
            "removed": oa.difference(&ob).collect::<Vec<_>>(),
        },
        "users": {
            "added": ub.difference(&ua).collect::<Vec<_>>(),
            "removed": ua.difference(&ub).collect::<Vec<_>>(),
        },
        "acl": ta.get("acl") != tb.get("acl") || ta.get("acl_default") != tb.get("acl_default"),
    })
}

impl Running {
    /// The running config.
    pub fn config(&self) -> &Config {
        &self.config
    }
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running").field("file", &self.file.as_ref().map(|f| &f.path)).finish()
    }
}
