//! Endpoints: the effective set courier delivers to — the config file's `[[endpoints]]` plus
//! those created through the endpoint API (stored in redb) — indexed so that the delivery
//! path never scans them.
//!
//! Why a registry and not the config snapshot: with thousands of API-made endpoints, a lookup
//! per delivery and a subscription match per ingest must not grow with their number, and
//! creating one endpoint must not copy all the others. Names map to endpoints in a hash map,
//! and event types map to subscribers through an index of exact names and prefixes. On a
//! name clash the config file wins; the API endpoint is kept but shadowed (and reported).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::config::{Config, ConfigError, EndpointConfig, RawEndpoint, build_endpoint};

/// An endpoint created through the API, as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredEndpoint {
    /// The fields of an `[[endpoints]]` entry, as given.
    pub spec: RawEndpoint,
    pub tenant: Option<String>,
    pub description: Option<String>,
    pub paused: bool,
    /// Secrets being rotated out, with the time (unix ms) they stop signing.
    pub retiring: Vec<(String, u64)>,
    pub created_ms: u64,
    pub updated_ms: u64,
}

impl StoredEndpoint {
    /// Validates the spec against the active `[delivery]` defaults and plugins.
    pub fn build(&self, config: &Config) -> Result<EndpointConfig, ConfigError> {
        let mut ep = build_endpoint(self.spec.clone(), "", &config.delivery, &config.plugins)?;
        ep.paused = self.paused;
        ep.retiring_secrets = self.retiring.clone();
        Ok(ep)
    }
}

/// Where an endpoint is defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Config,
    Api,
}

/// Subscription index: event type → endpoint names.
#[derive(Default)]
struct Subscriptions {
    /// No `event_types`, or `*`.
    all: BTreeSet<String>,
    exact: HashMap<String, BTreeSet<String>>,
    /// `order.*` is stored as the prefix `order.`.
    prefix: HashMap<String, BTreeSet<String>>,
    /// Anything else with a `*` inside (rare): matched one by one.
    glob: Vec<(String, String)>,
}

enum PatternKind<'a> {
    All,
    Exact(&'a str),
    Prefix(&'a str),
    Glob,
}

fn classify(pattern: &str) -> PatternKind<'_> {
    match pattern.find('*') {
        None => PatternKind::Exact(pattern),
        Some(_) if pattern == "*" => PatternKind::All,
        Some(i) if i == pattern.len() - 1 => PatternKind::Prefix(&pattern[..i]),
        Some(_) => PatternKind::Glob,
    }
}

impl Subscriptions {
    fn add(&mut self, ep: &EndpointConfig) {
        let Some(patterns) = &ep.event_types else {
            self.all.insert(ep.name.clone());
            return;
        };
        for p in patterns {
            match classify(p) {
                PatternKind::All => {
                    self.all.insert(ep.name.clone());
                }
                PatternKind::Exact(e) => {
                    self.exact
                        .entry(e.to_string())
                        .or_default()
                        .insert(ep.name.clone());
                }
                PatternKind::Prefix(pre) => {
                    self.prefix
                        .entry(pre.to_string())
                        .or_default()
                        .insert(ep.name.clone());
                }
                PatternKind::Glob => self.glob.push((p.clone(), ep.name.clone())),
            }
        }
    }

    fn remove(&mut self, ep: &EndpointConfig) {
        self.all.remove(&ep.name);
        for p in ep.event_types.iter().flatten() {
            match classify(p) {
                PatternKind::All => {}
                PatternKind::Exact(e) => remove_from(&mut self.exact, e, &ep.name),
                PatternKind::Prefix(pre) => remove_from(&mut self.prefix, pre, &ep.name),
                PatternKind::Glob => self.glob.retain(|(_, n)| *n != ep.name),
            }
        }
    }

    fn matching(&self, event_type: &str) -> BTreeSet<String> {
        let mut out = self.all.clone();
        if let Some(s) = self.exact.get(event_type) {
            out.extend(s.iter().cloned());
        }
        for i in 0..=event_type.len() {
            if event_type.is_char_boundary(i)
                && let Some(s) = self.prefix.get(&event_type[..i])
            {
                out.extend(s.iter().cloned());
            }
        }
        for (p, n) in &self.glob {
            if crate::config::pattern_matches(p, event_type) {
                out.insert(n.clone());
            }
        }
        out
    }
}

fn remove_from(map: &mut HashMap<String, BTreeSet<String>>, key: &str, name: &str) {
    if let Some(s) = map.get_mut(key) {
        s.remove(name);
        if s.is_empty() {
            map.remove(key);
        }
    }
}

#[derive(Default)]
struct Inner {
    config: HashMap<String, Arc<EndpointConfig>>,
    api: HashMap<String, (StoredEndpoint, Arc<EndpointConfig>)>,
    effective: HashMap<String, (Source, Arc<EndpointConfig>)>,
    subs: Subscriptions,
    /// Names that stopped being effective since [`Registry::take_departed`] last ran: the
    /// metrics scrape drops their series (a churn of short-lived endpoints must not grow
    /// `/metrics` for good). A set, so deleting one name again and again does not grow it.
    departed: HashSet<String>,
    /// Config-file endpoints paused through the API (stored by the store, applied here to
    /// whatever the file defines under the name, across reloads).
    config_paused: HashSet<String>,
}

impl Inner {
    /// Recomputes the effective endpoint for `name` (config wins) and its subscriptions.
    ///
    /// A pause belongs to the name: the effective definition is paused if either definition
    /// of the name is (a config endpoint paused through the API, or the API endpoint), so a
    /// reload that adds a config endpoint over a paused API one, or removes a paused config
    /// one from over an API one, does not send the held queue to the other definition's
    /// URL. A resume clears both.
    fn refresh(&mut self, name: &str) {
        if let Some((_, old)) = self.effective.remove(name) {
            self.subs.remove(&old);
        }
        let paused = self.config_paused.contains(name)
            || self.api.get(name).is_some_and(|(stored, _)| stored.paused);
        let held = |ep: &Arc<EndpointConfig>| {
            if ep.paused == paused {
                ep.clone()
            } else {
                let mut e = (**ep).clone();
                e.paused = paused;
                Arc::new(e)
            }
        };
        let now = if let Some(c) = self.config.get(name) {
            Some((Source::Config, held(c)))
        } else {
            self.api.get(name).map(|(_, b)| (Source::Api, held(b)))
        };
        if let Some((src, ep)) = now {
            self.subs.add(&ep);
            self.effective.insert(name.to_string(), (src, ep));
        } else {
            self.departed.insert(name.to_string());
        }
    }
}

/// The effective endpoints. Reads take a shared lock for a hash lookup.
#[derive(Default)]
pub struct Registry {
    inner: RwLock<Inner>,
    /// Held by an API change from reading the stored endpoint to installing the result: two
    /// changes at once (a pause and a rotation, a PATCH and a DELETE) would otherwise each
    /// write their own copy, and the last one would silently undo the other. A config
    /// reload holds it too, so that an endpoint is never built against one configuration and
    /// installed under the next.
    pub changes: tokio::sync::Mutex<()>,
    /// Passed by every ingest from looking up its endpoints until its event is handed to the
    /// store, and waited out by an API delete once the endpoint is gone from here: then every
    /// event that found the old endpoint is in the store's queue ahead of the delete's drop
    /// of its pending deliveries (see [`crate::gate`]).
    pub ingest_gate: crate::gate::IngestGate,
}

/// An endpoint as the API lists it.
#[derive(Debug, Clone)]
pub struct Listed {
    pub endpoint: Arc<EndpointConfig>,
    pub source: Source,
    pub stored: Option<StoredEndpoint>,
    /// An API endpoint hidden by a config endpoint of the same name.
    pub shadowed: bool,
}

impl Registry {
    pub fn get(&self, name: &str) -> Option<Arc<EndpointConfig>> {
        self.inner
            .read()
            .expect("registry")
            .effective
            .get(name)
            .map(|(_, e)| e.clone())
    }

    /// When the endpoint `name` was made through the API (0 for a config endpoint), if it
    /// exists: one entry of [`Endpoints::births`].
    pub fn born(&self, name: &str) -> Option<u64> {
        let inner = self.inner.read().expect("registry");
        let (source, _) = inner.effective.get(name)?;
        Some(match source {
            Source::Api => inner.api.get(name).map_or(0, |(s, _)| s.created_ms),
            Source::Config => 0,
        })
    }

    pub fn source(&self, name: &str) -> Option<Source> {
        self.inner
            .read()
            .expect("registry")
            .effective
            .get(name)
            .map(|(s, _)| *s)
    }

    /// Whether `name` is paused as a config-file endpoint (whether or not the file defines
    /// it now).
    pub fn config_paused(&self, name: &str) -> bool {
        self.inner
            .read()
            .expect("registry")
            .config_paused
            .contains(name)
    }

    pub fn stored(&self, name: &str) -> Option<StoredEndpoint> {
        self.inner
            .read()
            .expect("registry")
            .api
            .get(name)
            .map(|(s, _)| s.clone())
    }

    pub fn len(&self) -> usize {
        self.inner.read().expect("registry").effective.len()
    }

    /// Every endpoint in effect, with when it was created if it was made through the API
    /// (0 for a config endpoint, whose name is its identity); see [`crate::store::Births`].
    pub fn births(&self) -> crate::store::Births {
        let inner = self.inner.read().expect("registry");
        let births = inner
            .effective
            .iter()
            .map(|(name, (source, _))| {
                let born = match source {
                    Source::Api => inner.api.get(name).map_or(0, |(s, _)| s.created_ms),
                    Source::Config => 0,
                };
                (name.clone(), born)
            })
            .collect();
        std::sync::Arc::new(births)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every effective endpoint name.
    /// The names that stopped being endpoints since the last call (some may be endpoints
    /// again by now).
    pub fn take_departed(&self) -> HashSet<String> {
        std::mem::take(&mut self.inner.write().expect("registry").departed)
    }

    pub fn names(&self) -> Vec<String> {
        self.inner
            .read()
            .expect("registry")
            .effective
            .keys()
            .cloned()
            .collect()
    }

    /// Endpoints whose `event_types` match, in name order.
    pub fn subscribers(&self, event_type: &str) -> Vec<Arc<EndpointConfig>> {
        let inner = self.inner.read().expect("registry");
        inner
            .subs
            .matching(event_type)
            .iter()
            .filter_map(|n| inner.effective.get(n).map(|(_, e)| e.clone()))
            .collect()
    }

    /// Installs a configuration's endpoints and rebuilds the API endpoints against its
    /// defaults and plugins. Returns the names whose definition changed.
    pub fn set_config(&self, config: &Config) -> Vec<String> {
        for e in config.endpoints.iter().filter(|e| e.secrets.is_empty()) {
            tracing::warn!(endpoint = %e.name, "endpoint has no secrets: its deliveries are sent unsigned; add a whsec_ secret");
        }
        for e in &config.endpoints {
            if let Some(w) = e.unreachable_warning(config.delivery.allow_private_networks) {
                tracing::warn!(endpoint = %e.name, "{w}");
            }
        }
        let mut inner = self.inner.write().expect("registry");
        let mut touched: BTreeSet<String> = inner.config.keys().cloned().collect();
        let paused = &inner.config_paused;
        inner.config = config
            .endpoints
            .iter()
            .map(|e| {
                let mut e = e.clone();
                e.paused = paused.contains(&e.name);
                (e.name.clone(), Arc::new(e))
            })
            .collect();
        touched.extend(inner.config.keys().cloned());
        let api_names: Vec<String> = inner.api.keys().cloned().collect();
        for name in api_names {
            let (stored, _) = inner.api[&name].clone();
            if inner.config.contains_key(&name) {
                tracing::warn!(endpoint = %name, "an API endpoint has the name of a config endpoint: the config file wins");
            }
            match stored.build(config) {
                Ok(ep) => {
                    inner.api.insert(name.clone(), (stored, Arc::new(ep)));
                    touched.insert(name);
                }
                Err(e) => {
                    tracing::error!(endpoint = %name, error = %e, "API endpoint is not valid under the new configuration; keeping its previous definition")
                }
            }
        }
        for name in &touched {
            inner.refresh(name);
        }
        touched.into_iter().collect()
    }

    /// Checks that every API endpoint is still valid under `config` (its plugins exist with
    /// the right kind): a reload that would break one is rejected, as an invalid file is.
    pub fn check_api(&self, config: &Config) -> Result<(), Vec<String>> {
        let inner = self.inner.read().expect("registry");
        let errors: Vec<String> = inner
            .api
            .iter()
            .filter_map(|(name, (stored, _))| {
                stored.build(config).err().map(|e| {
                    format!("endpoint `{name}` (created through the API) would break: {e}")
                })
            })
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// Adds or replaces an API endpoint (already validated and stored).
    pub fn put_api(&self, stored: StoredEndpoint, built: EndpointConfig) {
        let mut inner = self.inner.write().expect("registry");
        let name = stored.spec.name.clone();
        inner.api.insert(name.clone(), (stored, Arc::new(built)));
        inner.refresh(&name);
    }

    /// Pauses or resumes the config-file endpoint `name` (the store has the pause already).
    /// Returns whether a config endpoint of that name is loaded.
    pub fn set_config_paused(&self, name: &str, paused: bool) -> bool {
        let mut inner = self.inner.write().expect("registry");
        if paused {
            inner.config_paused.insert(name.to_string());
        } else {
            inner.config_paused.remove(name);
        }
        let Some(current) = inner.config.get(name) else {
            // An API endpoint of the name may be in effect, held by this pause too.
            if inner.api.contains_key(name) {
                inner.refresh(name);
            }
            return false;
        };
        let mut ep = (**current).clone();
        ep.paused = paused;
        inner.config.insert(name.to_string(), Arc::new(ep));
        inner.refresh(name);
        true
    }

    pub fn remove_api(&self, name: &str) {
        let mut inner = self.inner.write().expect("registry");
        inner.api.remove(name);
        inner.refresh(name);
    }

    /// Endpoints in name order after `after`, optionally of one tenant.
    pub fn list(
        &self,
        tenant: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<Listed>, Option<String>) {
        let inner = self.inner.read().expect("registry");
        let mut names: Vec<&String> = inner.effective.keys().chain(inner.api.keys()).collect();
        names.sort();
        names.dedup();
        let mut out = Vec::new();
        let mut next = None;
        // The name the page ended on, once full: a next page is promised only if a later
        // name has an entry to show.
        let mut page_end: Option<&String> = None;
        for name in names {
            if after.is_some_and(|a| name.as_str() <= a) {
                continue;
            }
            let stored = inner.api.get(name).map(|(s, _)| s.clone());
            // The definition in effect as it is in effect (paused if either definition of the
            // name is: see `Inner::refresh`).
            let effective = inner.effective.get(name).map(|(_, e)| e.clone());
            let listed: Vec<Listed> = match (inner.config.get(name), inner.api.get(name)) {
                (Some(c), api) => {
                    let mut v = vec![Listed {
                        endpoint: effective.clone().unwrap_or_else(|| c.clone()),
                        source: Source::Config,
                        stored: None,
                        shadowed: false,
                    }];
                    if let Some((s, b)) = api {
                        v.push(Listed {
                            endpoint: b.clone(),
                            source: Source::Api,
                            stored: Some(s.clone()),
                            shadowed: true,
                        });
                    }
                    v
                }
                (None, Some((_, b))) => vec![Listed {
                    endpoint: effective.unwrap_or_else(|| b.clone()),
                    source: Source::Api,
                    stored,
                    shadowed: false,
                }],
                (None, None) => continue,
            };
            let shown = listed.into_iter().filter(|l| {
                let t = l.stored.as_ref().and_then(|s| s.tenant.as_deref());
                tenant.is_none() || t == tenant
            });
            if let Some(end) = page_end {
                if shown.count() > 0 {
                    next = Some(end.clone());
                    break;
                }
                continue;
            }
            out.extend(shown);
            if out.len() >= limit {
                page_end = Some(name);
            }
        }
        (out, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An endpoint stored before headers named twice in different cases were refused still
    /// loads (the check applies where endpoints are defined), keeping the value that sorts
    /// last, as it always did.
    #[test]
    fn an_endpoint_stored_with_a_header_named_twice_still_builds() {
        let stored: StoredEndpoint = serde_json::from_value(serde_json::json!({
            "spec": {"name": "a", "url": "https://example.com/",
                     "headers": {"X-A": "1", "x-a": "2"}},
            "tenant": null, "description": null, "paused": false, "retiring": [],
            "created_ms": 0, "updated_ms": 0
        }))
        .unwrap();
        let ep = stored.build(&Config::defaults()).unwrap();
        assert_eq!(ep.headers.get("x-a").map(String::as_str), Some("2"));
        assert!(crate::config::check_header_names(&stored.spec.headers, "headers").is_err());
    }

    fn ep(name: &str, types: Option<&[&str]>) -> EndpointConfig {
        let mut c = Config::parse(
            &format!("[[endpoints]]\nname = \"{name}\"\nurl = \"https://example.com/\"\n"),
            std::path::Path::new("."),
            None,
            "t",
        )
        .unwrap()
        .endpoints
        .remove(0);
        c.event_types = types.map(|t| t.iter().map(|s| s.to_string()).collect());
        c
    }

    /// An endpoint stored before patterns were limited to 256 characters still loads (the
    /// limit applies where endpoints are defined).
    #[test]
    fn a_stored_endpoint_with_a_longer_pattern_still_builds() {
        let config = Config::parse("", std::path::Path::new("."), None, "t").unwrap();
        let long = format!("order.{}", "x".repeat(300));
        let spec: RawEndpoint = serde_json::from_value(serde_json::json!({
            "name": "old", "url": "https://example.com/", "event_types": [long.clone()],
        }))
        .unwrap();
        assert!(crate::config::check_limits(&spec, "").is_err());
        let stored = StoredEndpoint {
            spec,
            tenant: None,
            description: None,
            paused: false,
            retiring: Vec::new(),
            created_ms: 0,
            updated_ms: 0,
        };
        let built = stored.build(&config).unwrap();
        assert!(built.subscribes(&long));
    }

    #[test]
    fn subscription_index_matches_like_the_patterns() {
        let mut s = Subscriptions::default();
        let eps = [
            ep("all", None),
            ep("star", Some(&["*"])),
            ep("orders", Some(&["order.*"])),
            ep("exact", Some(&["order.created", "user.deleted"])),
            ep("glob", Some(&["*.deleted"])),
        ];
        for e in &eps {
            s.add(e);
        }
        fn names(s: &Subscriptions, t: &str) -> Vec<String> {
            s.matching(t).into_iter().collect()
        }
        assert_eq!(
            names(&s, "order.created"),
            ["all", "exact", "orders", "star"]
        );
        assert_eq!(names(&s, "order.shipped"), ["all", "orders", "star"]);
        assert_eq!(names(&s, "user.deleted"), ["all", "exact", "glob", "star"]);
        assert_eq!(names(&s, "orders"), ["all", "star"]);
        for e in &eps {
            let expected = e.subscribes("order.created");
            assert_eq!(
                s.matching("order.created").contains(&e.name),
                expected,
                "{}",
                e.name
            );
        }
        s.remove(&eps[2]);
        s.remove(&eps[4]);
        assert_eq!(names(&s, "order.shipped"), ["all", "star"]);
        assert_eq!(names(&s, "user.deleted"), ["all", "exact", "star"]);
    }
}
