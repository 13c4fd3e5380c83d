//! The linearizability checker of a key-value history: the oracle for what
//! kvlds promises its clients (PROTOCOL.md, "Consistency and durability
//! promised to clients").
//!
//! # What it checks
//!
//! A [`History`] is every request a client sent (GET, SET, CAS, ADD,
//! MODIFY, DELETE, CAD, RANGE), when it was sent, and when and what the
//! answer was, if one came. [`check`] says whether some single order of
//! those requests, applied one at a time to a map, gives every answer that
//! was seen, where the order respects:
//!
//! 1. real time: if the response to `a` came before `b` was sent, `a` comes
//!    before `b`;
//! 2. connection order: two modifying requests on one key and one
//!    connection take effect in the order sent. If the later one took
//!    effect and it, or a request sent after it on that connection and
//!    key, was answered, the earlier one took effect too, before it (the
//!    byte stream is in order and kvlds applies it in order). Two requests
//!    neither of which was answered, nor any after them, are only kept in
//!    order: either may be left out;
//! 3. a request without a response may take effect at any time after it was
//!    sent, or never (with [`check_with`], only until its connection's
//!    effects end, e.g. when the server process died); an answered one
//!    takes effect exactly once, between being sent and being answered.
//!
//! A RANGE is a GET of every key the history knows (any call's key, any
//! returned key, any key of the initial map) in `[start, next)` (and below
//! `end`); its pairs must be strictly increasing, inside `[start, end)` and
//! below `next`, and each returned key must have been written by some call
//! or be in the initial map.
//!
//! # Algorithm
//!
//! Keys are independent (P-compositionality), so each key's calls are
//! checked alone against a model whose state is the key's value
//! (`Option<Bytes>`, interned to a `u32`). The search is Wing & Gong's: a
//! depth-first walk (an explicit stack) that places one call at a time,
//! choosing among the calls that may go next (sent no later than the
//! earliest deadline of an unplaced answered call, and whose connection
//! predecessor is placed), with Lowe's memoization of the explored (placed
//! calls, value) states. Calls that must take effect (answered, or sent
//! before an answered one on their connection and key) and calls that may
//! (the other unanswered ones) are kept apart. These reductions keep the
//! search small; each is complete (it never loses an order that exists,
//! which `agrees_with_brute_force_on_small_histories` checks against the
//! definition):
//!
//! - values no call reads or compares with (no GET saw them, no CAS or CAD
//!   names them) are merged into one: no answer can tell them apart;
//! - an answered call that cannot change the value given its answer (a GET,
//!   a CAS/ADD/MODIFY/CAD that answered "not done") and whose answer
//!   matches the current value is placed at once, with no alternative;
//! - of several answered calls with the same effect and answer, only the
//!   one with the earliest deadline is tried first; likewise for
//!   unanswered calls with nothing else pending on their connection;
//! - an unanswered call is placed only where it changes the value and
//!   leads somewhere: it makes a waiting call's answer possible, or lets
//!   another unanswered conditional call act, or must go now because its
//!   effects end before a call that may go next was sent; right after
//!   another unanswered call, only a conditional one may follow (an effect
//!   overwritten before anything observed it is left out), and the next
//!   answered call must be one the run made possible (any other could as
//!   well have gone before the run);
//! - a state is a dead end when some unplaced answered call needs a value
//!   just before it (a GET's value, a successful CAS's or CAD's old value,
//!   absent for a successful ADD) that is not the current one and that no
//!   call left can produce before it (one sent before it was answered);
//! - the memo is of failed states, and a state is also pruned when a failed
//!   one had the same placed answered calls and value but fewer unanswered
//!   calls used up: having more of them available can only help (past
//!   [`FAILED_PER_BUCKET_MAX`] such failed states, only equal ones prune,
//!   which keeps each state cheap).
//!
//! # Bound
//!
//! At most [`STATES_PER_KEY_MAX`] states are explored per key (one to a few
//! microseconds each in an optimized build; the memo of failed states
//! holds up to that many entries, each a bitset of the unanswered calls
//! and, past [`FAILED_PER_BUCKET_MAX`], one of the answered calls too). Past that the search is abandoned and
//! reported as a [`Violation`] saying so: a history too concurrent to check
//! fails loudly instead of passing. Unanswered calls that may take effect
//! at any later time are what makes a search large: pass when they stop
//! being possible ([`CheckOptions::effects_end_ns`]) if it is known.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use bytes::Bytes;

/// The most search states [`check`] explores for one key before it gives
/// up and reports the key as too concurrent to check.
pub const STATES_PER_KEY_MAX: u64 = 1_000_000;

/// The most failed states with the same placed required calls and value
/// that each new state is checked against for dominance.
const FAILED_PER_BUCKET_MAX: usize = 4096;

/// The most calls a violation's explanation lists one by one.
const EXPLAIN_CALLS_MAX: usize = 200;

/// The most placed calls a violation's explanation lists from the longest
/// order found (the last ones).
const EXPLAIN_ORDER_MAX: usize = 40;

/// The most calls a violation's explanation shows leading to a dead end.
const EXPLAIN_DEAD_ENDS_MAX: usize = 10;

/// The most bytes of a key or value shown in an explanation.
const SHOWN_BYTES_MAX: usize = 40;

/// A request on one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvOp {
    /// Sets the value.
    Set { value: Bytes },
    /// Sets `new` if the value is `old`.
    Cas { old: Bytes, new: Bytes },
    /// Sets the value if the key is absent.
    Add { value: Bytes },
    /// Sets the value if the key is present.
    Modify { value: Bytes },
    /// Removes the key.
    Delete,
    /// Removes the key if its value is `old`.
    Cad { old: Bytes },
    /// Reads the value.
    Get,
}

/// The answer to a [`KvOp`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvResult {
    /// The answer to a modifying request: true (status 0) when the change
    /// was made. SET and DELETE always answer true.
    Done(bool),
    /// The answer to a GET: the value, or `None` for absent.
    Value(Option<Bytes>),
}

/// One request on one key and what became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// The connection it was sent on.
    pub conn: u64,
    /// Its place in the order of sending on that connection (increasing).
    pub seq: u64,
    /// The key.
    pub key: Bytes,
    /// The request.
    pub op: KvOp,
    /// When it was sent.
    pub invoked_ns: u64,
    /// When the answer came and what it was; `None` if none ever came: the
    /// request may then have taken effect at any time after it was sent,
    /// or never.
    pub completed: Option<(u64, KvResult)>,
}

/// One answered RANGE request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeCall {
    /// The connection it was sent on.
    pub conn: u64,
    /// Its place in the order of sending on that connection.
    pub seq: u64,
    /// The first key asked for.
    pub start: Bytes,
    /// The key after the last one asked for; empty: past the last key.
    pub end: Bytes,
    /// When it was sent.
    pub invoked_ns: u64,
    /// When the answer came.
    pub completed_ns: u64,
    /// The pairs returned.
    pub pairs: Vec<(Bytes, Bytes)>,
    /// Where the answer stops covering keys; empty: past the last key.
    pub next: Bytes,
}

/// Everything clients sent and received.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    /// The single-key requests.
    pub calls: Vec<Call>,
    /// The answered RANGE requests.
    pub ranges: Vec<RangeCall>,
}

/// Why a history is not linearizable (or could not be checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The key whose calls have no valid order.
    pub key: Bytes,
    /// The calls on that key with their times and answers, the longest
    /// valid order found, and why no call can come next.
    pub explanation: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "linearizability violation on key {}\n{}", show_bytes(&self.key), self.explanation)
    }
}

impl std::error::Error for Violation {}

/// What a successful [`check`] looked at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckStats {
    /// Keys checked (keys with at least one call or RANGE covering them).
    pub keys: usize,
    /// Calls and RANGE calls in the history.
    pub calls: usize,
    /// Search states explored over all keys.
    pub states_explored: u64,
}

/// What [`check_with`] may assume beyond the history itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOptions {
    /// The most search states explored per key before giving up.
    pub states_per_key_max: u64,
    /// Per connection, a time after which none of its unanswered calls can
    /// take effect: typically when the server process it talked to died
    /// (a dead process applies nothing more). Unanswered calls on
    /// connections not listed may take effect at any time after they were
    /// sent. Every call on a listed connection must have been sent by then.
    /// Without it, many unanswered calls on one key can make the search
    /// too large.
    pub effects_end_ns: BTreeMap<u64, u64>,
}

impl Default for CheckOptions {
    fn default() -> CheckOptions {
        CheckOptions { states_per_key_max: STATES_PER_KEY_MAX, effects_end_ns: BTreeMap::new() }
    }
}

/// Checks that `history` is linearizable, starting from the map `initial`
/// (keys not in it start absent), exploring at most
/// [`STATES_PER_KEY_MAX`] states per key.
///
/// # Errors
///
/// A [`Violation`] for the first key (in key order) whose calls have no
/// valid order, for a malformed history (an answer of the wrong kind, an
/// answer before the request, two requests with one `seq` on a connection,
/// or a later `seq` sent earlier), for a malformed RANGE answer, or for a
/// key whose search went past the bound.
pub fn check(history: &History, initial: &BTreeMap<Bytes, Bytes>) -> Result<CheckStats, Violation> {
    check_with(history, initial, &CheckOptions::default())
}

/// [`check`] with `options`.
///
/// # Errors
///
/// As [`check`], and for a call sent on a connection after its
/// `effects_end_ns`.
pub fn check_with(
    history: &History,
    initial: &BTreeMap<Bytes, Bytes>,
    options: &CheckOptions,
) -> Result<CheckStats, Violation> {
    validate(history, initial, &options.effects_end_ns)?;
    let states_per_key_max = options.states_per_key_max;
    let keys = key_histories(history, initial, &options.effects_end_ns);
    let mut stats = CheckStats {
        keys: keys.len(),
        calls: history.calls.len() + history.ranges.len(),
        states_explored: 0,
    };
    for kh in keys.values() {
        let mut search = Search::new(&kh.ops, kh.initial, kh.values.by_id.len() + 2, states_per_key_max);
        let verdict = search.run();
        stats.states_explored += search.explored;
        if verdict != Verdict::Linearizable {
            return Err(Violation {
                key: kh.key.clone(),
                explanation: explain(kh, &search, verdict, history),
            });
        }
    }
    Ok(stats)
}

// ---------------------------------------------------------------------------
// Validation of the history's form.

/// A violation for a history that is malformed rather than inconsistent.
fn malformed(key: &Bytes, why: String) -> Violation {
    Violation { key: key.clone(), explanation: format!("malformed history: {why}") }
}

/// Checks the form of `history`: answers of the right kind and not before
/// their request, connection orders that are strict and agree with the
/// send times, and RANGE answers that are sorted, within their bounds, and
/// return only keys something wrote.
///
/// # Errors
///
/// A [`Violation`] naming the first problem found.
fn validate(
    history: &History,
    initial: &BTreeMap<Bytes, Bytes>,
    effects_end_ns: &BTreeMap<u64, u64>,
) -> Result<(), Violation> {
    for (index, call) in history.calls.iter().enumerate() {
        let Some((completed_ns, result)) = &call.completed else { continue };
        if *completed_ns < call.invoked_ns {
            return Err(malformed(
                &call.key,
                format!(
                    "calls[{index}] was answered ({completed_ns} ns) before it was sent ({} ns)",
                    call.invoked_ns
                ),
            ));
        }
        let is_get = matches!(call.op, KvOp::Get);
        let is_value = matches!(result, KvResult::Value(_));
        if is_get != is_value {
            return Err(malformed(
                &call.key,
                format!("calls[{index}] is {} but its answer is {result:?}", op_name(&call.op)),
            ));
        }
    }

    // (conn, seq, invoked_ns, label, key); labels are formatted only for
    // a violation (this runs for every call).
    let mut sent: Vec<(u64, u64, u64, SentLabel, &Bytes)> = Vec::new();
    for (index, call) in history.calls.iter().enumerate() {
        sent.push((call.conn, call.seq, call.invoked_ns, SentLabel::Call(index), &call.key));
    }
    for (index, range) in history.ranges.iter().enumerate() {
        sent.push((range.conn, range.seq, range.invoked_ns, SentLabel::Range(index), &range.start));
    }
    for (conn, _, invoked_ns, label, key) in &sent {
        if let Some(end_ns) = effects_end_ns.get(conn).filter(|&&end_ns| end_ns < *invoked_ns) {
            return Err(malformed(
                key,
                format!("{label} was sent at {invoked_ns} ns on connection {conn}, after its effects end at {end_ns} ns"),
            ));
        }
    }
    sent.sort_by_key(|s| (s.0, s.1));
    for pair in sent.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if a.0 != b.0 {
            continue;
        }
        if a.1 == b.1 {
            return Err(malformed(
                b.4,
                format!("{} and {} both have seq {} on connection {}", a.3, b.3, a.1, a.0),
            ));
        }
        if a.2 > b.2 {
            return Err(malformed(
                b.4,
                format!(
                    "on connection {}, {} (seq {}) was sent at {} ns, before {} (seq {}) at {} ns",
                    a.0, b.3, b.1, b.2, a.3, a.1, a.2
                ),
            ));
        }
    }

    let written: BTreeSet<&Bytes> = history
        .calls
        .iter()
        .filter(|c| {
            matches!(c.op, KvOp::Set { .. } | KvOp::Cas { .. } | KvOp::Add { .. } | KvOp::Modify { .. })
        })
        .map(|c| &c.key)
        .collect();
    for (index, range) in history.ranges.iter().enumerate() {
        // Formatted only for a violation: this runs for every RANGE.
        let what = || {
            format!(
                "ranges[{index}] (conn {} seq {}, RANGE [{}, {}) answered with next {})",
                range.conn,
                range.seq,
                show_bytes(&range.start),
                show_bound(&range.end),
                show_bound(&range.next)
            )
        };
        if range.completed_ns < range.invoked_ns {
            return Err(malformed(&range.start, format!("{} was answered before it was sent", what())));
        }
        for (position, (key, _)) in range.pairs.iter().enumerate() {
            let explanation = if position > 0 && range.pairs[position - 1].0 >= *key {
                format!(
                    "{} returned {} after {}: pairs must be strictly increasing",
                    what(),
                    show_bytes(key),
                    show_bytes(&range.pairs[position - 1].0)
                )
            } else if *key < range.start || (!range.end.is_empty() && *key >= range.end) {
                format!("{} returned {}, outside [start, end)", what(), show_bytes(key))
            } else if !range.next.is_empty() && *key >= range.next {
                format!(
                    "{} returned {}, at or past next: the answer claims to cover only keys below next",
                    what(),
                    show_bytes(key)
                )
            } else if !written.contains(key) && !initial.contains_key(key) {
                format!(
                    "{} returned {}, which no call ever wrote and the initial map does not hold",
                    what(),
                    show_bytes(key)
                )
            } else {
                continue;
            };
            return Err(Violation { key: key.clone(), explanation });
        }
    }
    Ok(())
}

/// A call or RANGE of a history, by its place, as a violation names it.
#[derive(Debug, Clone, Copy)]
enum SentLabel {
    Call(usize),
    Range(usize),
}

impl fmt::Display for SentLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SentLabel::Call(i) => write!(f, "calls[{i}]"),
            SentLabel::Range(i) => write!(f, "ranges[{i}]"),
        }
    }
}

// ---------------------------------------------------------------------------
// One key's history.

/// The interned value meaning "absent".
const ABSENT: u32 = 0;

/// The values seen on one key, each given a small id; id 0 is "absent".
#[derive(Debug, Default)]
struct Values {
    ids: HashMap<Bytes, u32>,
    /// The value of id `i` is `by_id[i - 1]`.
    by_id: Vec<Bytes>,
}

/// The id standing for every value no call reads or compares with, once
/// [`KeyHistory::finish`] has merged them: `by_id.len() + 1`.
fn unread_id(values: &Values) -> u32 {
    u32::try_from(values.by_id.len() + 1).expect("fewer than 2^32 values per key")
}

impl Values {
    /// The id of `value`, given one if it has none yet.
    fn id(&mut self, value: &Bytes) -> u32 {
        if let Some(&id) = self.ids.get(value) {
            return id;
        }
        self.by_id.push(value.clone());
        let id = u32::try_from(self.by_id.len()).expect("fewer than 2^32 values per key");
        self.ids.insert(value.clone(), id);
        id
    }

    /// The id of a value or of "absent".
    fn id_of(&mut self, value: Option<&Bytes>) -> u32 {
        value.map_or(ABSENT, |v| self.id(v))
    }

    /// A readable form of the value with id `id`.
    fn show(&self, id: u32) -> String {
        if id == ABSENT {
            "absent".to_string()
        } else if id == unread_id(self) {
            "a value no call reads".to_string()
        } else {
            show_bytes(&self.by_id[id as usize - 1])
        }
    }
}

/// A call's effect on its key, values interned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Effect {
    Set(u32),
    Cas { old: u32, new: u32 },
    Add(u32),
    Modify(u32),
    Delete,
    Cad(u32),
    Get,
}

/// What a call answers, values interned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Done(bool),
    Value(u32),
}

impl Effect {
    /// The value after applying this call to `state`, and its answer.
    fn apply(self, state: u32) -> (u32, Outcome) {
        match self {
            Effect::Set(value) => (value, Outcome::Done(true)),
            Effect::Cas { old, new } if state == old => (new, Outcome::Done(true)),
            Effect::Add(value) if state == ABSENT => (value, Outcome::Done(true)),
            Effect::Modify(value) if state != ABSENT => (value, Outcome::Done(true)),
            Effect::Delete => (ABSENT, Outcome::Done(true)),
            Effect::Cad(old) if state == old => (ABSENT, Outcome::Done(true)),
            Effect::Get => (state, Outcome::Value(state)),
            Effect::Cas { .. } | Effect::Add(_) | Effect::Modify(_) | Effect::Cad(_) => {
                (state, Outcome::Done(false))
            }
        }
    }

    /// Whether the call may change the value (everything but GET).
    fn is_modifying(self) -> bool {
        self != Effect::Get
    }

    /// Whether the change depends on the value (CAS, ADD, MODIFY, CAD).
    fn is_conditional(self) -> bool {
        matches!(self, Effect::Cas { .. } | Effect::Add(_) | Effect::Modify(_) | Effect::Cad(_))
    }

    /// A readable form, e.g. `CAS "a" -> "b"`.
    fn show(self, values: &Values) -> String {
        match self {
            Effect::Set(v) => format!("SET {}", values.show(v)),
            Effect::Cas { old, new } => format!("CAS {} -> {}", values.show(old), values.show(new)),
            Effect::Add(v) => format!("ADD {}", values.show(v)),
            Effect::Modify(v) => format!("MODIFY {}", values.show(v)),
            Effect::Delete => "DELETE".to_string(),
            Effect::Cad(old) => format!("CAD {}", values.show(old)),
            Effect::Get => "GET".to_string(),
        }
    }
}

/// A readable form of an answer.
fn show_outcome(outcome: Outcome, values: &Values) -> String {
    match outcome {
        Outcome::Done(done) => done.to_string(),
        Outcome::Value(v) => values.show(v),
    }
}

/// Where a call of one key's history came from in the [`History`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Call(usize),
    Range(usize),
}

/// Whether a call must be placed (it was answered, or an answered call
/// after it on its connection and key needs it), with its index among the
/// key's required calls, or may be left out, with its index among the
/// optional ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Required(usize),
    Optional(usize),
}

/// One call of one key's history.
#[derive(Debug, Clone)]
struct KeyOp {
    origin: Origin,
    conn: u64,
    seq: u64,
    invoked_ns: u64,
    completed_ns: Option<u64>,
    /// The latest time the call can take effect, if known: when it was
    /// answered, or else when its connection's effects end.
    deadline_ns: Option<u64>,
    /// What the call does, where every value no call reads or compares
    /// with (no GET saw it, no CAS or CAD names it as old) is merged into
    /// one: such values are indistinguishable to every call.
    effect: Effect,
    /// What the call does, with the values as sent (for explanations).
    shown_effect: Effect,
    /// The answer seen; `None` when none came.
    observed: Option<Outcome>,
    /// The modifying call sent just before this one on its connection and
    /// key (modifying calls only).
    chain_pred: Option<usize>,
    /// The modifying call sent just after this one on its connection and
    /// key.
    chain_succ: Option<usize>,
    /// The nearest required call before this one on its connection and
    /// key (modifying calls only): it must be placed before this one.
    required_pred: Option<usize>,
    slot: Slot,
}

impl KeyOp {
    /// Whether `outcome` is the answer seen (any answer is, if none came).
    fn matches(&self, outcome: Outcome) -> bool {
        self.observed.is_none_or(|seen| seen == outcome)
    }

    /// The value the key must have just before this call for its answer
    /// to be the one seen, if the answer pins it down: a GET's value, the
    /// old value of a CAS or CAD that answered "done", absent for an ADD
    /// that answered "done".
    fn need(&self) -> Option<u32> {
        match (self.effect, self.observed?) {
            (Effect::Get, Outcome::Value(v)) => Some(v),
            (Effect::Cas { old, .. } | Effect::Cad(old), Outcome::Done(true)) => Some(old),
            (Effect::Add(_), Outcome::Done(true)) => Some(ABSENT),
            _ => None,
        }
    }

    /// The value this call may leave the key with, if it may change it.
    fn produces(&self) -> Option<u32> {
        if self.is_read_only() {
            return None;
        }
        match self.effect {
            Effect::Set(v) | Effect::Add(v) | Effect::Modify(v) | Effect::Cas { new: v, .. } => Some(v),
            Effect::Delete | Effect::Cad(_) => Some(ABSENT),
            Effect::Get => None,
        }
    }

    /// Whether the answer seen means the call changed nothing, wherever it
    /// is placed: a GET, or a conditional call that answered "not done".
    fn is_read_only(&self) -> bool {
        match self.observed {
            Some(Outcome::Value(_)) => true,
            Some(Outcome::Done(false)) => self.effect.is_conditional(),
            _ => false,
        }
    }
}

/// The calls on one key, sorted by invocation, classified.
#[derive(Debug)]
struct KeyHistory {
    key: Bytes,
    values: Values,
    /// The initial value, unread values merged (see [`KeyOp::effect`]).
    initial: u32,
    /// The initial value as given.
    shown_initial: u32,
    ops: Vec<KeyOp>,
}

impl KeyHistory {
    /// An empty history for `key`, whose value starts as `initial`.
    fn new(key: &Bytes, initial: Option<&Bytes>) -> KeyHistory {
        let mut values = Values::default();
        let initial = values.id_of(initial);
        KeyHistory { key: key.clone(), values, initial, shown_initial: initial, ops: Vec::new() }
    }

    /// Adds the call `call` (at `index` in the history), whose
    /// connection's effects end at `effects_end_ns` if known.
    fn push_call(&mut self, index: usize, call: &Call, effects_end_ns: Option<u64>) {
        let values = &mut self.values;
        let effect = match &call.op {
            KvOp::Set { value } => Effect::Set(values.id(value)),
            KvOp::Cas { old, new } => Effect::Cas { old: values.id(old), new: values.id(new) },
            KvOp::Add { value } => Effect::Add(values.id(value)),
            KvOp::Modify { value } => Effect::Modify(values.id(value)),
            KvOp::Delete => Effect::Delete,
            KvOp::Cad { old } => Effect::Cad(values.id(old)),
            KvOp::Get => Effect::Get,
        };
        let observed = call.completed.as_ref().map(|(_, result)| match result {
            KvResult::Done(done) => Outcome::Done(*done),
            KvResult::Value(value) => Outcome::Value(values.id_of(value.as_ref())),
        });
        self.ops.push(KeyOp {
            origin: Origin::Call(index),
            conn: call.conn,
            seq: call.seq,
            invoked_ns: call.invoked_ns,
            completed_ns: call.completed.as_ref().map(|(ns, _)| *ns),
            deadline_ns: call.completed.as_ref().map(|(ns, _)| *ns).or(effects_end_ns),
            effect,
            shown_effect: effect,
            observed,
            chain_pred: None,
            chain_succ: None,
            required_pred: None,
            slot: Slot::Optional(usize::MAX),
        });
    }

    /// Adds the RANGE `range` (at `index` in the history) as a GET that saw
    /// `seen`.
    fn push_range(&mut self, index: usize, range: &RangeCall, seen: Option<&Bytes>) {
        let seen = self.values.id_of(seen);
        self.ops.push(KeyOp {
            origin: Origin::Range(index),
            conn: range.conn,
            seq: range.seq,
            invoked_ns: range.invoked_ns,
            completed_ns: Some(range.completed_ns),
            deadline_ns: Some(range.completed_ns),
            effect: Effect::Get,
            shown_effect: Effect::Get,
            observed: Some(Outcome::Value(seen)),
            chain_pred: None,
            chain_succ: None,
            required_pred: None,
            slot: Slot::Optional(usize::MAX),
        });
    }

    /// Sorts the calls by invocation, links each modifying call to the one
    /// before it on its connection, and decides which must be placed.
    fn finish(&mut self) {
        let unread = unread_id(&self.values);
        let mut read = vec![false; unread as usize];
        read[ABSENT as usize] = true;
        for op in &self.ops {
            match (op.effect, op.observed) {
                (Effect::Get, Some(Outcome::Value(v))) => read[v as usize] = true,
                (Effect::Cas { old, .. } | Effect::Cad(old), _) => read[old as usize] = true,
                _ => {}
            }
        }
        let merge = |v: u32| if read[v as usize] { v } else { unread };
        self.initial = merge(self.initial);
        for op in &mut self.ops {
            op.effect = match op.effect {
                Effect::Set(v) => Effect::Set(merge(v)),
                Effect::Cas { old, new } => Effect::Cas { old, new: merge(new) },
                Effect::Add(v) => Effect::Add(merge(v)),
                Effect::Modify(v) => Effect::Modify(merge(v)),
                other => other,
            };
        }

        let ops = &mut self.ops;
        ops.sort_by_key(|op| op.invoked_ns);
        let mut chains: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for (i, op) in ops.iter().enumerate() {
            if op.effect.is_modifying() {
                chains.entry(op.conn).or_default().push(i);
            }
        }
        let mut required: Vec<bool> = ops.iter().map(|op| op.completed_ns.is_some()).collect();
        for chain in chains.values_mut() {
            chain.sort_by_key(|&i| ops[i].seq);
            for pair in chain.windows(2) {
                ops[pair[1]].chain_pred = Some(pair[0]);
                ops[pair[0]].chain_succ = Some(pair[1]);
            }
            let mut answered_later = false;
            for &i in chain.iter().rev() {
                answered_later |= ops[i].completed_ns.is_some();
                required[i] |= answered_later;
            }
        }
        let (mut required_count, mut optional_count) = (0, 0);
        for (op, required) in ops.iter_mut().zip(required) {
            op.slot = if required {
                required_count += 1;
                Slot::Required(required_count - 1)
            } else {
                optional_count += 1;
                Slot::Optional(optional_count - 1)
            };
        }
        for chain in chains.values() {
            let mut last_required = None;
            for &i in chain {
                ops[i].required_pred = last_required;
                if let Slot::Required(_) = ops[i].slot {
                    assert_eq!(
                        ops[i].required_pred, ops[i].chain_pred,
                        "a required call's predecessor is required"
                    );
                    last_required = Some(i);
                }
            }
        }
    }
}

/// Splits the history by key: every call (but a GET that was never
/// answered: it constrains nothing), and every RANGE as a GET of each key
/// the history knows that it covers.
fn key_histories(
    history: &History,
    initial: &BTreeMap<Bytes, Bytes>,
    effects_end_ns: &BTreeMap<u64, u64>,
) -> BTreeMap<Bytes, KeyHistory> {
    // Every key any call, RANGE answer or the initial state names, sorted;
    // each key's history is found by its place here, and a RANGE walks the
    // keys it covers beside its sorted pairs.
    let mut universe: Vec<&Bytes> = history.calls.iter().map(|c| &c.key).collect();
    universe.extend(history.ranges.iter().flat_map(|r| r.pairs.iter().map(|(k, _)| k)));
    universe.extend(initial.keys());
    universe.sort_unstable();
    universe.dedup();
    let place = |key: &Bytes| universe.binary_search(&key).expect("every key is in the universe");
    let mut histories: Vec<Option<KeyHistory>> = (0..universe.len()).map(|_| None).collect();
    for (index, call) in history.calls.iter().enumerate() {
        if call.completed.is_none() && call.op == KvOp::Get {
            continue;
        }
        histories[place(&call.key)]
            .get_or_insert_with(|| KeyHistory::new(&call.key, initial.get(&call.key)))
            .push_call(index, call, effects_end_ns.get(&call.conn).copied());
    }
    for (index, range) in history.ranges.iter().enumerate() {
        let first = universe.partition_point(|k| **k < range.start);
        let mut pairs = range.pairs.iter().peekable();
        for (at, &key) in universe.iter().enumerate().skip(first) {
            if (!range.end.is_empty() && *key >= range.end) || (!range.next.is_empty() && *key >= range.next)
            {
                break;
            }
            while pairs.next_if(|(k, _)| k < key).is_some() {}
            let seen = pairs.peek().filter(|(k, _)| k == key).map(|(_, v)| v);
            histories[at]
                .get_or_insert_with(|| KeyHistory::new(key, initial.get(key)))
                .push_range(index, range, seen);
        }
    }
    let mut keys: BTreeMap<Bytes, KeyHistory> =
        universe.iter().zip(histories).filter_map(|(&key, kh)| kh.map(|kh| (key.clone(), kh))).collect();
    for kh in keys.values_mut() {
        kh.finish();
    }
    keys
}

// ---------------------------------------------------------------------------
// The search.

/// A set of small integers.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(len: usize) -> Bits {
        Bits(vec![0; len.div_ceil(64)])
    }

    fn get(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }

    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }

    fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }

    /// Whether every member of `self` is in `other` (same length).
    fn is_subset_of(&self, other: &[u64]) -> bool {
        self.0.iter().zip(other).all(|(a, b)| a & !b == 0)
    }
}

/// The outcome of one key's search.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Linearizable,
    NotLinearizable,
    Abandoned,
}

/// The run of optional calls placed last (since the last required one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    /// The value before the run.
    start_state: u32,
    /// Whether a call of the run has a deadline (its connection's effects
    /// end): then it may have had to go before the next required call for
    /// that reason alone.
    has_deadline: bool,
}

impl Run {
    /// Whether a state after this run (or after none: `None`) is no more
    /// restricted than one after `other`, all else equal.
    fn allows_all_of(this: Option<Run>, other: Option<Run>) -> bool {
        match (this, other) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(a), Some(b)) => a.start_state == b.start_state && (a.has_deadline || !b.has_deadline),
        }
    }
}

/// A failed state, whole.
#[derive(Debug, PartialEq, Eq)]
struct ExactFailed {
    linearized: Bits,
    consumed: Bits,
    state: u32,
    run: Option<Run>,
}

/// The failed states with the same placed required calls and value.
#[derive(Debug)]
struct FailedBucket {
    linearized: Bits,
    state: u32,
    /// The consumed optional calls and the run of each, at most
    /// [`FAILED_PER_BUCKET_MAX`].
    failed: Vec<(Bits, Option<Run>)>,
}

/// A search state, kept for the explanation.
#[derive(Debug, Clone)]
struct Snapshot {
    path: Vec<usize>,
    linearized: Bits,
    consumed: Bits,
    state: u32,
    run: Option<Run>,
    placed: usize,
}

/// How to undo placing a call.
#[derive(Debug)]
struct Move {
    op: usize,
    state_before: u32,
    run_before: Option<Run>,
    /// Optional calls this one made impossible: sent before it on its
    /// connection and key, or whose effects end before it was sent.
    killed: Vec<usize>,
}

/// One level of the depth-first search.
#[derive(Debug)]
struct Frame {
    children: Vec<usize>,
    next: usize,
    moved: Option<Move>,
    fingerprint: u64,
    /// Every required call before this index (in invocation order) is
    /// placed.
    lw_required: usize,
    /// Every call before this index of `by_return` is placed.
    lw_return: usize,
}

/// What entering a state gave.
enum Entered {
    Goal,
    Pruned,
    Abandoned,
    Frame(Frame),
}

/// The search over one key's calls.
struct Search<'a> {
    ops: &'a [KeyOp],
    states_max: u64,
    /// Op index of each required call, in invocation order.
    required: Vec<usize>,
    /// Op index of each optional call, in invocation order.
    optional: Vec<usize>,
    /// Required index of each call with a deadline (answered, or on a
    /// connection whose effects end), by deadline.
    by_return: Vec<usize>,
    /// Optional index of each call whose connection's effects end, by
    /// that time.
    optional_by_deadline: Vec<usize>,
    /// Required calls placed.
    linearized: Bits,
    /// Optional calls placed or made impossible.
    consumed: Bits,
    /// The value after the calls placed.
    state: u32,
    /// The run of optional calls placed since the last required one, if
    /// the last call placed was optional.
    run: Option<Run>,
    placed: usize,
    path: Vec<usize>,
    /// Failed states by [`Search::fingerprint`]: checked for dominance.
    failed: HashMap<u64, Vec<FailedBucket>>,
    /// Failed states past [`FAILED_PER_BUCKET_MAX`] of one bucket, by
    /// [`Search::exact_fingerprint`]: checked for equality only (scanning
    /// more consumed sets per state would make each state slow).
    failed_exact: HashMap<u64, Vec<ExactFailed>>,
    explored: u64,
    best: Option<Snapshot>,
    /// Per call: its index among the needers, if its answer needs a value
    /// just before it (see [`KeyOp::need`]).
    needer_of: Vec<Option<usize>>,
    /// Per needer: the call.
    needer_ops: Vec<usize>,
    /// Per needer: the value it needs.
    needed: Vec<u32>,
    /// Per call: the needers it may produce the value for (it may leave
    /// that value and may come before them).
    consumers: Vec<Vec<usize>>,
    /// Per needer: the calls that may produce its value and are neither
    /// placed nor consumed.
    supply: Vec<u32>,
    /// Per value: unplaced needers of it with no supply.
    dry_needers: Vec<u32>,
    /// Unplaced needers with no supply. While one of them needs another
    /// value than the current one, the state is a dead end.
    dry_total: usize,
}

impl<'a> Search<'a> {
    /// A search over `ops` (finished by [`KeyHistory::finish`]) from the
    /// value `initial`, exploring at most `states_max` states.
    fn new(ops: &'a [KeyOp], initial: u32, value_count: usize, states_max: u64) -> Search<'a> {
        let mut required = Vec::new();
        let mut optional = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            match op.slot {
                Slot::Required(r) => {
                    assert_eq!(r, required.len());
                    required.push(i);
                }
                Slot::Optional(o) => {
                    assert_eq!(o, optional.len());
                    optional.push(i);
                }
            }
        }
        let mut by_return: Vec<usize> =
            (0..required.len()).filter(|&r| ops[required[r]].deadline_ns.is_some()).collect();
        by_return.sort_by_key(|&r| (ops[required[r]].deadline_ns, r));
        let mut optional_by_deadline: Vec<usize> =
            (0..optional.len()).filter(|&o| ops[optional[o]].deadline_ns.is_some()).collect();
        optional_by_deadline.sort_by_key(|&o| (ops[optional[o]].deadline_ns, o));
        let mut search = Search {
            ops,
            states_max,
            linearized: Bits::new(required.len()),
            consumed: Bits::new(optional.len()),
            required,
            optional,
            by_return,
            optional_by_deadline,
            state: initial,
            run: None,
            placed: 0,
            path: Vec::new(),
            failed: HashMap::new(),
            failed_exact: HashMap::new(),
            explored: 0,
            best: None,
            needer_of: vec![None; ops.len()],
            needer_ops: Vec::new(),
            needed: Vec::new(),
            consumers: vec![Vec::new(); ops.len()],
            supply: Vec::new(),
            dry_needers: vec![0; value_count],
            dry_total: 0,
        };
        let mut producers: Vec<Vec<usize>> = vec![Vec::new(); value_count];
        for (p, op) in ops.iter().enumerate() {
            if let Some(v) = op.produces() {
                producers[v as usize].push(p);
            }
        }
        for (r, needer) in ops.iter().enumerate() {
            let Some(v) = needer.need() else { continue };
            let deadline_ns = needer.deadline_ns.expect("a call with an answer has a deadline");
            let n = search.needed.len();
            search.needer_of[r] = Some(n);
            search.needer_ops.push(r);
            search.needed.push(v);
            search.supply.push(0);
            for &p in &producers[v as usize] {
                let op = &ops[p];
                // A producer sent after the needer was answered, or sent
                // after it on its connection, comes after it.
                let after = op.invoked_ns > deadline_ns
                    || (needer.effect.is_modifying() && op.conn == needer.conn && op.seq > needer.seq);
                if p != r && !after {
                    search.consumers[p].push(n);
                    search.supply[n] += 1;
                }
            }
            if search.supply[n] == 0 {
                search.dry_total += 1;
                search.dry_needers[v as usize] += 1;
            }
        }
        search
    }

    /// Whether some unplaced call needs a value other than the current one
    /// that no call left can produce before it.
    fn is_starved(&self) -> bool {
        self.dry_total > self.dry_needers[self.state as usize] as usize
    }

    /// Counts call `i` as placed or consumed (`delta` -1) or not (+1): as a
    /// needer no longer (or again) waiting, and as a producer no longer
    /// (or again) available. Its own placement flag must not matter: the
    /// needers it produces for are other calls.
    fn count_op(&mut self, i: usize, delta: i32) {
        if let Some(n) = self.needer_of[i] {
            if self.supply[n] == 0 {
                let v = self.needed[n] as usize;
                if delta < 0 {
                    self.dry_total -= 1;
                    self.dry_needers[v] -= 1;
                } else {
                    self.dry_total += 1;
                    self.dry_needers[v] += 1;
                }
            }
        }
        for k in 0..self.consumers[i].len() {
            let n = self.consumers[i][k];
            let waiting = match self.ops[self.needer_ops[n]].slot {
                Slot::Required(r) => !self.linearized.get(r),
                Slot::Optional(_) => unreachable!("needers have answers"),
            };
            let v = self.needed[n] as usize;
            if delta < 0 {
                self.supply[n] -= 1;
                if self.supply[n] == 0 && waiting {
                    self.dry_total += 1;
                    self.dry_needers[v] += 1;
                }
            } else {
                if self.supply[n] == 0 && waiting {
                    self.dry_total -= 1;
                    self.dry_needers[v] -= 1;
                }
                self.supply[n] += 1;
            }
        }
    }

    /// Searches for a valid order of all required calls.
    fn run(&mut self) -> Verdict {
        let dry_at_start = self.dry_total;
        let mut stack: Vec<Frame> = Vec::new();
        match self.enter(0, 0) {
            Entered::Goal => return Verdict::Linearizable,
            Entered::Abandoned => return Verdict::Abandoned,
            Entered::Pruned => return Verdict::NotLinearizable,
            Entered::Frame(frame) => stack.push(frame),
        }
        while let Some(top) = stack.last_mut() {
            if top.next < top.children.len() {
                let op = top.children[top.next];
                top.next += 1;
                let (lw_required, lw_return) = (top.lw_required, top.lw_return);
                let moved = self.place(op);
                match self.enter(lw_required, lw_return) {
                    Entered::Goal => return Verdict::Linearizable,
                    Entered::Abandoned => return Verdict::Abandoned,
                    Entered::Pruned => self.undo(moved),
                    Entered::Frame(mut frame) => {
                        frame.moved = Some(moved);
                        stack.push(frame);
                    }
                }
            } else {
                let frame = stack.pop().expect("the stack is not empty");
                self.remember_failed(frame.fingerprint);
                if let Some(moved) = frame.moved {
                    self.undo(moved);
                }
            }
        }
        // Every move was undone: the counts are as they started.
        assert!(self.path.is_empty() && self.placed == 0, "every move is undone");
        assert_eq!(self.dry_total, dry_at_start, "placing and undoing keep the needer counts");
        Verdict::NotLinearizable
    }

    /// Counts the current state, and returns whether it is the goal, is
    /// pruned, is past the bound, or else its frame of calls to try next.
    fn enter(&mut self, mut lw_required: usize, mut lw_return: usize) -> Entered {
        self.explored += 1;
        if self.best.as_ref().is_none_or(|best| self.placed > best.placed) {
            self.best = Some(Snapshot {
                path: self.path.clone(),
                linearized: self.linearized.clone(),
                consumed: self.consumed.clone(),
                state: self.state,
                run: self.run,
                placed: self.placed,
            });
        }
        while lw_required < self.required.len() && self.linearized.get(lw_required) {
            lw_required += 1;
        }
        while lw_return < self.by_return.len() && self.linearized.get(self.by_return[lw_return]) {
            lw_return += 1;
        }
        if lw_return == self.by_return.len() {
            // Every unanswered required call precedes an answered one on
            // its connection, so it is placed too.
            assert_eq!(self.placed, self.required.len(), "all required calls are placed");
            return Entered::Goal;
        }
        if self.explored > self.states_max {
            return Entered::Abandoned;
        }
        if self.is_starved() {
            return Entered::Pruned;
        }
        let fingerprint = self.fingerprint();
        if self.dominated(fingerprint) {
            return Entered::Pruned;
        }
        let children = self.children(lw_required, lw_return);
        Entered::Frame(Frame { children, next: 0, moved: None, fingerprint, lw_required, lw_return })
    }

    /// The earliest deadline of an unplaced required call, given the
    /// low-water mark `lw_return` (which must not be at the end): no call
    /// sent after it may be placed before that call.
    fn earliest_return_ns(&self, lw_return: usize) -> u64 {
        self.ops[self.required[self.by_return[lw_return]]].deadline_ns.expect("by_return has deadlines")
    }

    /// Whether the required calls sent before `op` on its connection and
    /// key are placed.
    fn pred_placed(&self, op: &KeyOp) -> bool {
        match op.required_pred.map(|p| self.ops[p].slot) {
            Some(Slot::Required(r)) => self.linearized.get(r),
            Some(Slot::Optional(_)) => unreachable!("required_pred is required"),
            None => true,
        }
    }

    /// The calls worth placing next, in the order to try them.
    ///
    /// - A read-only required call whose answer matches, and whose placing
    ///   ends no optional call's chance, is the only child: it may as well
    ///   go now.
    /// - Otherwise every required call that may go next and whose answer
    ///   matches, by deadline; of several with the same effect and answer,
    ///   only the first (see below). Right after a run of optional calls
    ///   without deadlines, only those whose answer the run made possible.
    /// - Then every optional call that may go next, changes the value (and
    ///   is conditional if the last call placed was optional), and leads
    ///   somewhere: the value it leaves makes a waiting required call
    ///   answer as it did (or, if unanswered, differently) where it could
    ///   not before, or lets another optional conditional call change the
    ///   value, or it must go before a required call that may go next
    ///   (whose sending is after its effects end). An optional call that
    ///   does none of these may as well be placed after the next required
    ///   call, or never. Of several free ones with the same effect, only
    ///   the first (see below).
    fn children(&self, lw_required: usize, lw_return: usize) -> Vec<usize> {
        let earliest_return_ns = self.earliest_return_ns(lw_return);
        let mut children = Vec::new();
        // Required calls that may go next but whose answer needs another
        // value: a run of optional calls could help them.
        let mut waiting: Vec<&KeyOp> = Vec::new();
        // The latest sending of a required call that may go next.
        let mut latest_invoked_ns = 0;
        for r in lw_required..self.required.len() {
            let i = self.required[r];
            let op = &self.ops[i];
            if op.invoked_ns > earliest_return_ns {
                break;
            }
            if self.linearized.get(r) || !self.pred_placed(op) {
                continue;
            }
            latest_invoked_ns = latest_invoked_ns.max(op.invoked_ns);
            let (_, outcome) = op.effect.apply(self.state);
            // Right after a run of optional calls, only a required call
            // that needed the run may go (any other could have gone before
            // it, or the run is useless), unless the run had to go early.
            if let Some(run) = self.run.filter(|run| !run.has_deadline) {
                let before = op.effect.apply(run.start_state).1;
                let needed_run = if op.observed.is_some() { !op.matches(before) } else { before != outcome };
                if !needed_run {
                    continue;
                }
            }
            if op.observed.is_none() && op.effect.is_conditional() {
                waiting.push(op);
            }
            if !op.matches(outcome) {
                waiting.push(op);
                continue;
            }
            if op.is_read_only() && !self.ends_an_optional(op.invoked_ns) {
                return vec![i];
            }
            children.push(i);
        }
        children.sort_by_key(|&i| (self.ops[i].deadline_ns.unwrap_or(u64::MAX), i));
        // Of two required calls with the same effect and answer, the one
        // with the earlier deadline may as well go first if it was sent no
        // later: in any order placing the other first, swapping them breaks
        // nothing (unless the other has an unplaced successor on its
        // connection, which the swap would pass).
        let mut classes: Vec<(Effect, Option<Outcome>, u64)> = Vec::new();
        children.retain(|&i| {
            let op = &self.ops[i];
            let stood_in = classes.iter().any(|&(effect, observed, invoked_ns)| {
                effect == op.effect && observed == op.observed && invoked_ns <= op.invoked_ns
            });
            if !stood_in {
                classes.push((op.effect, op.observed, op.invoked_ns));
                return true;
            }
            op.chain_succ
                .is_some_and(|s| matches!(self.ops[s].slot, Slot::Required(r) if !self.linearized.get(r)))
        });
        let first_optional = children.len();
        // The optional calls that may go next.
        let mut pending: Vec<usize> = Vec::new();
        for (o, &i) in self.optional.iter().enumerate() {
            let op = &self.ops[i];
            if op.invoked_ns > earliest_return_ns {
                break;
            }
            if !self.consumed.get(o) && self.pred_placed(op) {
                pending.push(i);
            }
        }
        let mut conditional_effects: Vec<Effect> = Vec::new();
        for &i in &pending {
            let effect = self.ops[i].effect;
            if effect.is_conditional() && !conditional_effects.contains(&effect) {
                conditional_effects.push(effect);
            }
        }
        // Whether leaving a value leads somewhere: a waiting required call
        // answers as seen (or, unanswered, differently) with it and not
        // with the current value, or an optional conditional call would
        // change it. Cached per value.
        let mut leads_somewhere: Vec<(u32, bool)> = Vec::new();
        for &i in &pending {
            let op = &self.ops[i];
            if self.run.is_some() && !op.effect.is_conditional() {
                continue;
            }
            let after = op.effect.apply(self.state).0;
            if after == self.state {
                continue;
            }
            let leads = match leads_somewhere.iter().find(|(value, _)| *value == after) {
                Some(&(_, leads)) => leads,
                None => {
                    let helps = |r: &&KeyOp| {
                        let (now, then) = (r.effect.apply(self.state).1, r.effect.apply(after).1);
                        if r.observed.is_some() {
                            !r.matches(now) && r.matches(then)
                        } else {
                            now != then
                        }
                    };
                    let leads = waiting.iter().any(helps)
                        || conditional_effects.iter().any(|effect| effect.apply(after).0 != after);
                    leads_somewhere.push((after, leads));
                    leads
                }
            };
            let expiring = op.deadline_ns.is_some_and(|d| d < latest_invoked_ns);
            if expiring || leads {
                children.push(i);
            }
        }
        // Of two free optional calls (nothing pending before or after them
        // on their connection and key) with the same effect, one sent no
        // later and whose effects end no later can stand in for the other
        // wherever the other is placed (and the other then takes its
        // place): try only it.
        let deadline = |i: usize| (self.ops[i].deadline_ns.unwrap_or(u64::MAX), i);
        let optional_children = children.split_off(first_optional);
        let mut free_by_effect: HashMap<Effect, Vec<usize>> = HashMap::new();
        for &i in &optional_children {
            if self.is_free(&self.ops[i]) {
                free_by_effect.entry(self.ops[i].effect).or_default().push(i);
            }
        }
        for &i in &optional_children {
            let op = &self.ops[i];
            let stood_in = free_by_effect.get(&op.effect).is_some_and(|free| {
                free.contains(&i)
                    && free.iter().any(|&c| {
                        c != i && deadline(c) < deadline(i) && self.ops[c].invoked_ns <= op.invoked_ns
                    })
            });
            if !stood_in {
                children.push(i);
            }
        }
        children
    }

    /// Whether placing a call sent at `invoked_ns` would end the chance of
    /// an optional call whose effects end before then.
    fn ends_an_optional(&self, invoked_ns: u64) -> bool {
        for &o in &self.optional_by_deadline {
            if self.ops[self.optional[o]].deadline_ns.is_some_and(|d| d >= invoked_ns) {
                return false;
            }
            if !self.consumed.get(o) {
                return true;
            }
        }
        false
    }

    /// Whether optional call `op` has no optional call before or after it
    /// on its connection and key that is neither placed nor consumed.
    fn is_free(&self, op: &KeyOp) -> bool {
        let pending = |neighbour: Option<usize>| match neighbour.map(|n| self.ops[n].slot) {
            Some(Slot::Optional(o)) => !self.consumed.get(o),
            Some(Slot::Required(_)) | None => false,
        };
        !pending(op.chain_pred) && !pending(op.chain_succ)
    }

    /// Places call `i`, returning how to undo it.
    fn place(&mut self, i: usize) -> Move {
        let op = &self.ops[i];
        // Counted while still unplaced, so that its own need leaves the
        // counts of waiting needers.
        self.count_op(i, -1);
        let mut killed = Vec::new();
        match op.slot {
            Slot::Required(r) => {
                self.linearized.set(r);
                self.placed += 1;
            }
            Slot::Optional(o) => {
                self.consumed.set(o);
                // Optional calls sent before it on the connection can no
                // longer take effect. If one is already consumed, so are
                // all before it.
                let mut pred = op.chain_pred;
                while let Some(p) = pred {
                    match self.ops[p].slot {
                        Slot::Optional(po) if !self.consumed.get(po) => {
                            self.consumed.set(po);
                            killed.push(po);
                            self.count_op(p, -1);
                            pred = self.ops[p].chain_pred;
                        }
                        _ => break,
                    }
                }
            }
        }
        // Optional calls whose effects end before this call was sent can no
        // longer take effect.
        for k in 0..self.optional_by_deadline.len() {
            let o = self.optional_by_deadline[k];
            let p = self.optional[o];
            if self.ops[p].deadline_ns.is_some_and(|d| d >= op.invoked_ns) {
                break;
            }
            if !self.consumed.get(o) {
                self.consumed.set(o);
                killed.push(o);
                self.count_op(p, -1);
            }
        }
        let moved = Move { op: i, state_before: self.state, run_before: self.run, killed };
        self.run = match op.slot {
            Slot::Required(_) => None,
            Slot::Optional(_) => {
                let run = self.run.unwrap_or(Run { start_state: self.state, has_deadline: false });
                Some(Run { has_deadline: run.has_deadline || op.deadline_ns.is_some(), ..run })
            }
        };
        self.state = op.effect.apply(self.state).0;
        self.path.push(i);
        moved
    }

    /// Undoes [`Search::place`], in the reverse order.
    fn undo(&mut self, moved: Move) {
        assert_eq!(self.path.pop(), Some(moved.op), "moves are undone in reverse");
        self.state = moved.state_before;
        self.run = moved.run_before;
        for &o in moved.killed.iter().rev() {
            self.consumed.clear(o);
            self.count_op(self.optional[o], 1);
        }
        match self.ops[moved.op].slot {
            Slot::Required(r) => {
                self.linearized.clear(r);
                self.placed -= 1;
            }
            Slot::Optional(o) => self.consumed.clear(o),
        }
        self.count_op(moved.op, 1);
    }

    /// A hash of the placed required calls and the value.
    fn fingerprint(&self) -> u64 {
        let mut hash = u64::from(self.state) ^ 0x9e37_79b9_7f4a_7c15;
        for &word in &self.linearized.0 {
            hash = mix(hash ^ word);
        }
        mix(hash)
    }

    /// A hash of the whole state: [`Search::fingerprint`] and the consumed
    /// optional calls and the run.
    fn exact_fingerprint(&self, fingerprint: u64) -> u64 {
        let mut hash = fingerprint;
        for &word in &self.consumed.0 {
            hash = mix(hash ^ word);
        }
        let run =
            self.run.map_or(0, |run| (u64::from(run.start_state) << 1 | u64::from(run.has_deadline)) + 1);
        mix(hash ^ run)
    }

    /// Whether a failed state had the same placed required calls and value,
    /// a subset of the consumed optional calls, and no more restriction
    /// (or, past the dominance checks, was this very state).
    fn dominated(&self, fingerprint: u64) -> bool {
        let bucket = self.failed.get(&fingerprint).and_then(|buckets| {
            buckets.iter().find(|bucket| bucket.state == self.state && bucket.linearized == self.linearized)
        });
        let Some(bucket) = bucket else { return false };
        if bucket.failed.iter().any(|(consumed, run)| {
            Run::allows_all_of(*run, self.run) && consumed.is_subset_of(&self.consumed.0)
        }) {
            return true;
        }
        self.failed_exact.get(&self.exact_fingerprint(fingerprint)).is_some_and(|failed| {
            failed.iter().any(|failed| {
                failed.state == self.state
                    && failed.run == self.run
                    && failed.linearized == self.linearized
                    && failed.consumed == self.consumed
            })
        })
    }

    /// Records the current state as failed.
    fn remember_failed(&mut self, fingerprint: u64) {
        let exact = self.exact_fingerprint(fingerprint);
        let buckets = self.failed.entry(fingerprint).or_default();
        let position = buckets.iter().position(|b| b.state == self.state && b.linearized == self.linearized);
        let bucket = match position {
            Some(position) => &mut buckets[position],
            None => {
                buckets.push(FailedBucket {
                    linearized: self.linearized.clone(),
                    state: self.state,
                    failed: Vec::new(),
                });
                buckets.last_mut().expect("just pushed")
            }
        };
        if bucket.failed.len() < FAILED_PER_BUCKET_MAX {
            bucket.failed.push((self.consumed.clone(), self.run));
        } else {
            self.failed_exact.entry(exact).or_default().push(ExactFailed {
                linearized: self.linearized.clone(),
                consumed: self.consumed.clone(),
                state: self.state,
                run: self.run,
            });
        }
    }
}

/// The splitmix64 finalizer.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

// ---------------------------------------------------------------------------
// Explanations.

/// A readable form of bytes: quoted, escaped, long ones cut.
fn show_bytes(bytes: &[u8]) -> String {
    let shown = &bytes[..bytes.len().min(SHOWN_BYTES_MAX)];
    if bytes.len() > SHOWN_BYTES_MAX {
        format!("\"{}\"..({} bytes)", shown.escape_ascii(), bytes.len())
    } else {
        format!("\"{}\"", shown.escape_ascii())
    }
}

/// A readable form of a range bound (empty: past the last key).
fn show_bound(bound: &[u8]) -> String {
    if bound.is_empty() {
        "(end)".to_string()
    } else {
        show_bytes(bound)
    }
}

/// A readable virtual time.
fn show_ns(ns: u64) -> String {
    format!("{}.{:09}s", ns / 1_000_000_000, ns % 1_000_000_000)
}

/// The name of a request.
fn op_name(op: &KvOp) -> &'static str {
    match op {
        KvOp::Set { .. } => "SET",
        KvOp::Cas { .. } => "CAS",
        KvOp::Add { .. } => "ADD",
        KvOp::Modify { .. } => "MODIFY",
        KvOp::Delete => "DELETE",
        KvOp::Cad { .. } => "CAD",
        KvOp::Get => "GET",
    }
}

/// One line about call `i` of `kh`: where it is in the history, its
/// connection, times, request and answer.
fn describe(kh: &KeyHistory, history: &History, i: usize) -> String {
    let op = &kh.ops[i];
    let (origin, what) = match op.origin {
        Origin::Call(index) => (format!("calls[{index}]"), op.shown_effect.show(&kh.values)),
        Origin::Range(index) => {
            let range = &history.ranges[index];
            (
                format!("ranges[{index}]"),
                format!(
                    "RANGE [{}, {}) next {}, as a GET",
                    show_bytes(&range.start),
                    show_bound(&range.end),
                    show_bound(&range.next)
                ),
            )
        }
    };
    let answer = match (op.observed, op.slot) {
        (Some(outcome), _) => format!("-> {}", show_outcome(outcome, &kh.values)),
        (None, Slot::Optional(_)) => match op.deadline_ns {
            Some(end_ns) => format!("-> no response (may have taken effect by {}, or not)", show_ns(end_ns)),
            None => "-> no response (may have taken effect, or not)".to_string(),
        },
        (None, Slot::Required(_)) => {
            "-> no response (took effect: a later call on its connection and key was answered)".to_string()
        }
    };
    let completed = op.completed_ns.map_or_else(|| "...".to_string(), show_ns);
    format!(
        "#{i} {origin} conn {} seq {} [{} .. {}] {what} {answer}",
        op.conn,
        op.seq,
        show_ns(op.invoked_ns),
        completed
    )
}

/// The explanation of a failed search on `kh`: its calls, the longest
/// valid order found, and why nothing can follow it.
fn explain(kh: &KeyHistory, search: &Search<'_>, verdict: Verdict, history: &History) -> String {
    use std::fmt::Write as _;

    let required_count = search.required.len();
    let optional_count = search.optional.len();
    let mut out = String::new();
    if verdict == Verdict::Abandoned {
        let _ = writeln!(
            out,
            "The search was abandoned after {} states (the bound is {} per key): the history of this key is \
             too concurrent to check, so it is reported as a failure rather than passed unchecked.",
            search.explored, search.states_max
        );
        let unbounded = search.optional.iter().filter(|&&i| kh.ops[i].deadline_ns.is_none()).count();
        if unbounded > 0 {
            let _ = writeln!(
                out,
                "{unbounded} calls without a response may take effect at any later time; saying when their \
                 connections' effects end (CheckOptions::effects_end_ns) shrinks the search."
            );
        }
    } else {
        let _ = writeln!(
            out,
            "No order of the {required_count} calls on this key that must take effect (with {optional_count} \
             without a response that may) gives the answers seen while respecting real time and \
             connection order ({} states explored).",
            search.explored
        );
    }
    let _ = writeln!(out, "Initial value: {}.", kh.values.show(kh.shown_initial));
    let Some(best) = &search.best else { return out };
    // List the calls around the first one the longest order could not
    // place.
    let focus =
        (0..search.required.len()).find(|&r| !best.linearized.get(r)).map_or(0, |r| search.required[r]);
    let shown_start =
        focus.saturating_sub(EXPLAIN_CALLS_MAX / 4).min(kh.ops.len().saturating_sub(EXPLAIN_CALLS_MAX));
    let shown_end = (shown_start + EXPLAIN_CALLS_MAX).min(kh.ops.len());
    let _ = writeln!(out, "Calls, in order of invocation:");
    if shown_start > 0 {
        let _ = writeln!(out, "  ... ({shown_start} earlier calls)");
    }
    for i in shown_start..shown_end {
        let _ = writeln!(out, "  {}", describe(kh, history, i));
    }
    if shown_end < kh.ops.len() {
        let _ = writeln!(out, "  ... ({} later calls)", kh.ops.len() - shown_end);
    }

    let _ = write!(
        out,
        "The longest valid order found places {} of the {required_count} calls that must take effect:",
        best.placed
    );
    if best.path.len() > EXPLAIN_ORDER_MAX {
        let _ = write!(out, " ... ({} earlier),", best.path.len() - EXPLAIN_ORDER_MAX);
    }
    for &i in best.path.iter().skip(best.path.len().saturating_sub(EXPLAIN_ORDER_MAX)) {
        let _ = write!(out, " #{i}");
    }
    // The path is valid with the values as sent too: merging unread
    // values changes no answer.
    let shown_state =
        best.path.iter().fold(kh.shown_initial, |state, &i| kh.ops[i].shown_effect.apply(state).0);
    let _ = writeln!(out, "; the value is then {}.", kh.values.show(shown_state));

    let waiting = search
        .required
        .iter()
        .enumerate()
        .filter(|&(r, &i)| !best.linearized.get(r) && kh.ops[i].deadline_ns.is_some())
        .min_by_key(|&(_, &i)| kh.ops[i].deadline_ns);
    let Some((_, &first)) = waiting else { return out };
    let earliest_return_ns = kh.ops[first].deadline_ns.expect("has a deadline");
    let _ = writeln!(
        out,
        "From there, only calls invoked by {} (when #{first} was answered or its effects ended) may come next, \
         and none can:",
        show_ns(earliest_return_ns)
    );
    let available = |i: usize| match kh.ops[i].slot {
        Slot::Required(r) => !best.linearized.get(r),
        Slot::Optional(o) => !best.consumed.get(o),
    };
    // A needer whose value is not the current one and that no call left
    // can produce before it.
    let starved = |i: usize| {
        let n = search.needer_of[i]?;
        let v = search.needed[n];
        let supplied = (0..kh.ops.len()).any(|p| available(p) && search.consumers[p].contains(&n));
        (v != best.state && !supplied).then_some(v)
    };
    for (r, &i) in search.required.iter().enumerate() {
        let op = &kh.ops[i];
        if best.linearized.get(r) || op.invoked_ns > earliest_return_ns {
            continue;
        }
        let pred = op
            .required_pred
            .filter(|&p| matches!(kh.ops[p].slot, Slot::Required(pr) if !best.linearized.get(pr)));
        let (_, outcome) = op.effect.apply(best.state);
        let (_, shown_outcome) = op.shown_effect.apply(shown_state);
        let what = op.shown_effect.show(&kh.values);
        let why = if let Some(p) = pred {
            format!("must follow #{p}, sent before it on connection {}", op.conn)
        } else if !op.matches(outcome) {
            format!(
                "{what} answered {}, but here it would answer {}",
                op.observed.map_or_else(|| "nothing".to_string(), |o| show_outcome(o, &kh.values)),
                show_outcome(shown_outcome, &kh.values)
            )
        } else if let Some(v) = starved(i) {
            format!(
                "{what} needs the value {} just before it, and no call left can produce it in time",
                kh.values.show(v)
            )
        } else {
            "could go next, but every order continuing with it fails later".to_string()
        };
        let _ = writeln!(out, "  #{i} {why}");
    }
    for (r, &i) in search.required.iter().enumerate() {
        let op = &kh.ops[i];
        if best.linearized.get(r) || op.invoked_ns <= earliest_return_ns {
            continue;
        }
        if let Some(v) = starved(i) {
            let _ = writeln!(
                out,
                "  (later) #{i} {} needs the value {} just before it, and no call left can produce it in time",
                op.shown_effect.show(&kh.values),
                kh.values.show(v)
            );
        }
    }
    // Calls that could go next but change the value so that a call
    // waiting for another value could never see it.
    let mut dead_ends = 0;
    for (c, op) in kh.ops.iter().enumerate() {
        let may_go = match op.slot {
            Slot::Required(r) => {
                !best.linearized.get(r)
                    && op.required_pred.is_none_or(|p| !available(p))
                    && op.matches(op.effect.apply(best.state).1)
            }
            Slot::Optional(_) => available(c) && op.required_pred.is_none_or(|p| !available(p)),
        };
        let after = op.effect.apply(best.state).0;
        if !may_go
            || op.invoked_ns > earliest_return_ns
            || after == best.state
            || dead_ends == EXPLAIN_DEAD_ENDS_MAX
        {
            continue;
        }
        let starved_by = (0..search.needed.len()).find(|&n| {
            let r = search.needer_ops[n];
            r != c
                && available(r)
                && search.needed[n] != after
                && !(0..kh.ops.len()).any(|p| p != c && available(p) && search.consumers[p].contains(&n))
        });
        if let Some(n) = starved_by {
            let r = search.needer_ops[n];
            dead_ends += 1;
            let _ = writeln!(
                out,
                "  #{c} {} could go next, but then #{r} {} (which needs the value {} just before it) could never \
                 be placed: no call left can produce that value in time",
                op.shown_effect.show(&kh.values),
                kh.ops[r].shown_effect.show(&kh.values),
                kh.values.show(search.needed[n])
            );
        }
    }
    let mut tried: Vec<String> = Vec::new();
    for (o, &i) in search.optional.iter().enumerate() {
        let op = &kh.ops[i];
        if !best.consumed.get(o) && op.invoked_ns <= earliest_return_ns {
            tried.push(format!("#{i}"));
        }
    }
    if !tried.is_empty() {
        let _ = writeln!(
            out,
            "Calls without a response that may take effect there (each was tried): {}.",
            tried.join(" ")
        );
    }
    if best.run.is_some() {
        let _ = writeln!(
            out,
            "(The last call placed had no response, so the next one without a response must be conditional.)"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{Concern, Stream};

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn set(v: &str) -> KvOp {
        KvOp::Set { value: b(v) }
    }

    fn done(d: bool) -> KvResult {
        KvResult::Done(d)
    }

    fn val(v: Option<&str>) -> KvResult {
        KvResult::Value(v.map(b))
    }

    /// Builds histories, numbering each connection's requests.
    #[derive(Default)]
    struct H {
        history: History,
        seqs: HashMap<u64, u64>,
    }

    impl H {
        fn next_seq(&mut self, conn: u64) -> u64 {
            let seq = self.seqs.entry(conn).or_default();
            *seq += 1;
            *seq
        }

        /// An answered call.
        fn call(&mut self, conn: u64, key: &str, op: KvOp, times: (u64, u64), result: KvResult) -> &mut H {
            let seq = self.next_seq(conn);
            self.history.calls.push(Call {
                conn,
                seq,
                key: b(key),
                op,
                invoked_ns: times.0,
                completed: Some((times.1, result)),
            });
            self
        }

        /// A call never answered.
        fn lost(&mut self, conn: u64, key: &str, op: KvOp, invoked_ns: u64) -> &mut H {
            let seq = self.next_seq(conn);
            self.history.calls.push(Call { conn, seq, key: b(key), op, invoked_ns, completed: None });
            self
        }

        /// An answered RANGE.
        fn range(
            &mut self,
            conn: u64,
            bounds: (&str, &str, &str),
            times: (u64, u64),
            pairs: &[(&str, &str)],
        ) -> &mut H {
            let seq = self.next_seq(conn);
            self.history.ranges.push(RangeCall {
                conn,
                seq,
                start: b(bounds.0),
                end: b(bounds.1),
                invoked_ns: times.0,
                completed_ns: times.1,
                pairs: pairs.iter().map(|(k, v)| (b(k), b(v))).collect(),
                next: b(bounds.2),
            });
            self
        }

        fn check(&self) -> Result<CheckStats, Violation> {
            check(&self.history, &BTreeMap::new())
        }
    }

    #[test]
    fn sequential_history_passes() {
        let mut h = H::default();
        h.call(1, "k", KvOp::Get, (0, 1), val(None))
            .call(1, "k", set("a"), (2, 3), done(true))
            .call(1, "k", KvOp::Get, (4, 5), val(Some("a")))
            .call(1, "k", KvOp::Cas { old: b("a"), new: b("b") }, (6, 7), done(true))
            .call(1, "k", KvOp::Modify { value: b("c") }, (8, 9), done(true))
            .call(1, "k", KvOp::Cad { old: b("c") }, (10, 11), done(true))
            .call(1, "k", KvOp::Get, (12, 13), val(None))
            .call(1, "j", KvOp::Add { value: b("x") }, (14, 15), done(true))
            .call(1, "j", KvOp::Delete, (16, 17), done(true));
        let stats = h.check().expect("sequential history is linearizable");
        assert_eq!(stats.keys, 2);
        assert_eq!(stats.calls, 9);
    }

    #[test]
    fn stale_read_after_acked_write_fails() {
        let mut h = H::default();
        h.call(1, "k", set("a"), (0, 10), done(true)).call(2, "k", KvOp::Get, (20, 30), val(None));
        let violation = h.check().expect_err("the GET began after the SET was acknowledged");
        assert_eq!(violation.key, b("k"));
        assert!(
            violation.explanation.contains("GET answered absent, but here it would answer \"a\""),
            "{violation}"
        );
        assert!(violation.to_string().contains("key \"k\""));
    }

    #[test]
    fn concurrent_write_and_read_may_go_either_way() {
        for seen in [None, Some("a")] {
            let mut h = H::default();
            h.call(1, "k", set("a"), (0, 10), done(true)).call(2, "k", KvOp::Get, (5, 15), val(seen));
            h.check().expect("the GET overlaps the SET");
        }
    }

    #[test]
    fn write_without_response_may_or_may_not_appear() {
        for seen in [None, Some("a")] {
            let mut h = H::default();
            h.lost(1, "k", set("a"), 0).call(2, "k", KvOp::Get, (100, 110), val(seen));
            h.check().expect("an unanswered SET may or may not have taken effect");
        }
        // Once seen, it stays: it cannot be undone.
        let mut h = H::default();
        h.lost(1, "k", set("a"), 0).call(2, "k", KvOp::Get, (100, 110), val(Some("a"))).call(
            2,
            "k",
            KvOp::Get,
            (120, 130),
            val(None),
        );
        h.check().expect_err("the unanswered SET took effect once");
        // It cannot take effect before it was sent.
        let mut h = H::default();
        h.call(2, "k", KvOp::Get, (0, 10), val(Some("a"))).lost(1, "k", set("a"), 20);
        h.check().expect_err("the GET ended before the SET was sent");
    }

    #[test]
    fn read_of_value_never_written_fails() {
        let mut h = H::default();
        h.call(1, "k", set("a"), (0, 10), done(true)).call(2, "k", KvOp::Get, (5, 15), val(Some("zzz")));
        let violation = h.check().expect_err("nothing wrote zzz");
        assert!(violation.explanation.contains("\"zzz\""), "{violation}");
    }

    #[test]
    fn pipelined_writes_on_one_connection_take_effect_in_order() {
        // Two SETs pipelined on one connection, both answered together; a
        // GET after both sees the first one: the second cannot have come
        // first.
        let mut h = H::default();
        h.call(1, "k", set("a"), (0, 10), done(true)).call(1, "k", set("b"), (1, 10), done(true)).call(
            2,
            "k",
            KvOp::Get,
            (20, 30),
            val(Some("a")),
        );
        let violation = h.check().expect_err("SET b was sent after SET a on the same connection");
        assert!(
            violation.explanation.contains("GET answered \"a\", but here it would answer \"b\""),
            "{violation}"
        );

        // On two connections either order is fine.
        let mut h = H::default();
        h.call(1, "k", set("a"), (0, 10), done(true)).call(3, "k", set("b"), (1, 10), done(true)).call(
            2,
            "k",
            KvOp::Get,
            (20, 30),
            val(Some("a")),
        );
        h.check().expect("different connections");

        // GETs are not ordered by the connection.
        let mut h = H::default();
        h.call(1, "k", KvOp::Get, (0, 10), val(Some("a"))).call(1, "k", KvOp::Get, (1, 10), val(None)).call(
            2,
            "k",
            set("a"),
            (0, 10),
            done(true),
        );
        h.check().expect("reads on one connection may be reordered");

        // Nor are writes to different keys.
        let mut h = H::default();
        h.call(1, "k", set("a"), (0, 10), done(true))
            .call(1, "j", set("b"), (1, 10), done(true))
            .call(2, "j", KvOp::Get, (2, 3), val(Some("b")))
            .call(2, "k", KvOp::Get, (4, 5), val(None));
        h.check().expect("different keys");
    }

    #[test]
    fn unanswered_request_before_an_answered_one_took_effect() {
        // DELETE (never answered) then ADD (answered "not done") on one
        // connection: the ADD's answer means the DELETE did not happen, but
        // the stream is in order, so it did. Not linearizable.
        let initial = BTreeMap::from([(b("k"), b("x"))]);
        let mut h = H::default();
        h.lost(1, "k", KvOp::Delete, 0).call(1, "k", KvOp::Add { value: b("y") }, (1, 10), done(false));
        let violation = check(&h.history, &initial).expect_err("the DELETE precedes the ADD");
        assert!(violation.explanation.contains("took effect: a later call"), "{violation}");

        // With the ADD on another connection the DELETE may not have
        // happened.
        let mut h = H::default();
        h.lost(1, "k", KvOp::Delete, 0).call(2, "k", KvOp::Add { value: b("y") }, (1, 10), done(false));
        check(&h.history, &initial).expect("the DELETE is optional");

        // Two unanswered requests: the later may happen without the
        // earlier, but not before it.
        let mut h = H::default();
        h.lost(1, "k", set("a"), 0)
            .lost(1, "k", set("b"), 1)
            .call(2, "k", KvOp::Get, (10, 11), val(Some("b")))
            .call(2, "k", KvOp::Get, (12, 13), val(Some("b")));
        h.check().expect("SET b alone");
        let mut h = H::default();
        h.lost(1, "k", set("a"), 0)
            .lost(1, "k", set("b"), 1)
            .call(2, "k", KvOp::Get, (10, 11), val(Some("b")))
            .call(2, "k", KvOp::Get, (12, 13), val(Some("a")));
        h.check().expect_err("SET a cannot take effect after SET b");
    }

    #[test]
    fn conditional_results_are_checked() {
        let add = || KvOp::Add { value: b("x") };
        let mut h = H::default();
        h.call(1, "k", add(), (0, 1), done(true)).call(1, "k", add(), (2, 3), done(true));
        h.check().expect_err("ADD cannot succeed twice without a DELETE between");

        let mut h = H::default();
        h.call(1, "k", add(), (0, 1), done(true))
            .call(2, "k", KvOp::Delete, (2, 3), done(true))
            .call(1, "k", add(), (4, 5), done(true))
            .call(1, "k", add(), (6, 7), done(false));
        h.check().expect("ADD, DELETE, ADD, failing ADD");

        let mut h = H::default();
        h.call(1, "k", set("a"), (0, 1), done(true)).call(
            1,
            "k",
            KvOp::Cas { old: b("b"), new: b("c") },
            (2, 3),
            done(true),
        );
        h.check().expect_err("CAS from a value that is not there");

        let mut h = H::default();
        h.call(1, "k", set("a"), (0, 1), done(true)).call(
            1,
            "k",
            KvOp::Cas { old: b("a"), new: b("c") },
            (2, 3),
            done(false),
        );
        h.check().expect_err("CAS from the value that is there must succeed");

        let mut h = H::default();
        h.call(1, "k", KvOp::Modify { value: b("a") }, (0, 1), done(true));
        h.check().expect_err("MODIFY of an absent key");

        let mut h = H::default();
        h.call(1, "k", set("a"), (0, 1), done(true)).call(
            1,
            "k",
            KvOp::Cad { old: b("b") },
            (2, 3),
            done(true),
        );
        h.check().expect_err("CAD of a value that is not there");

        let mut h = H::default();
        h.call(1, "k", set("a"), (0, 1), done(false));
        h.check().expect_err("SET always succeeds");

        // Two concurrent CAS from one value: exactly one wins.
        let cas = |new: &str| KvOp::Cas { old: b("a"), new: b(new) };
        let mut h = H::default();
        h.call(1, "k", set("a"), (0, 1), done(true))
            .call(2, "k", cas("b"), (2, 10), done(true))
            .call(3, "k", cas("c"), (2, 10), done(false))
            .call(1, "k", KvOp::Get, (11, 12), val(Some("b")));
        h.check().expect("one CAS wins");
        let mut h = H::default();
        h.call(1, "k", set("a"), (0, 1), done(true)).call(2, "k", cas("b"), (2, 10), done(true)).call(
            3,
            "k",
            cas("c"),
            (2, 10),
            done(true),
        );
        h.check().expect_err("both CAS cannot win");
    }

    #[test]
    fn ranges_are_checked_per_key() {
        let mut h = H::default();
        h.call(1, "a", set("1"), (0, 1), done(true))
            .call(1, "c", set("3"), (2, 3), done(true))
            .call(1, "e", set("5"), (4, 5), done(true))
            .range(2, ("a", "", ""), (10, 11), &[("a", "1"), ("c", "3"), ("e", "5")])
            .range(2, ("b", "e", "e"), (12, 13), &[("c", "3")])
            // Paged: covers only keys below next.
            .range(2, ("a", "", "b"), (14, 15), &[("a", "1")]);
        let stats = h.check().expect("consistent ranges");
        assert_eq!(stats.keys, 3);
    }

    #[test]
    fn range_missing_an_acked_key_fails() {
        let mut h = H::default();
        h.call(1, "a", set("1"), (0, 1), done(true)).call(1, "c", set("3"), (2, 3), done(true)).range(
            2,
            ("a", "z", "z"),
            (10, 11),
            &[("a", "1")],
        );
        let violation = h.check().expect_err("c was acknowledged before the RANGE and is inside it");
        assert_eq!(violation.key, b("c"));
        assert!(violation.explanation.contains("ranges[0]"), "{violation}");

        // A key at or past next is not covered by the answer.
        let mut h = H::default();
        h.call(1, "a", set("1"), (0, 1), done(true)).call(1, "c", set("3"), (2, 3), done(true)).range(
            2,
            ("a", "z", "b"),
            (10, 11),
            &[("a", "1")],
        );
        h.check().expect("c is past next");
    }

    #[test]
    fn malformed_range_answers_fail() {
        let base = || {
            let mut h = H::default();
            h.call(1, "a", set("1"), (0, 1), done(true)).call(1, "c", set("3"), (2, 3), done(true));
            h
        };
        let mut h = base();
        h.range(2, ("a", "z", "b"), (10, 11), &[("a", "1"), ("c", "3")]);
        let violation = h.check().expect_err("c is at or past next");
        assert_eq!(violation.key, b("c"));
        assert!(violation.explanation.contains("past next"), "{violation}");

        let mut h = base();
        h.range(2, ("a", "c", ""), (10, 11), &[("a", "1"), ("c", "3")]);
        h.check().expect_err("end is exclusive");

        let mut h = base();
        h.range(2, ("a", "", ""), (10, 11), &[("c", "3"), ("a", "1")]);
        h.check().expect_err("pairs out of order");

        let mut h = base();
        h.range(2, ("a", "", ""), (10, 11), &[("a", "1"), ("b", "2"), ("c", "3")]);
        let violation = h.check().expect_err("b was never written");
        assert!(violation.explanation.contains("no call ever wrote"), "{violation}");
    }

    #[test]
    fn malformed_histories_are_reported() {
        let mut h = H::default();
        h.call(1, "k", KvOp::Get, (0, 1), done(true));
        assert!(h.check().expect_err("GET with a Done answer").explanation.starts_with("malformed"));

        let mut h = H::default();
        h.call(1, "k", set("a"), (10, 5), done(true));
        assert!(h.check().expect_err("answered before sent").explanation.starts_with("malformed"));

        let mut h = H::default();
        h.call(1, "k", set("a"), (10, 11), done(true)).call(1, "k", set("b"), (5, 11), done(true));
        assert!(h.check().expect_err("seq 2 sent before seq 1").explanation.starts_with("malformed"));
    }

    #[test]
    fn late_unanswered_calls_stay_cheap() {
        // Many unanswered writes sent after everything else, and many
        // before, of which the reads saw a few: they are optional.
        let mut h = H::default();
        for i in 0..40 {
            h.lost(100 + i, "k", set(&format!("early{i}")), i);
        }
        for (t, seen) in [(100, "early3"), (110, "early17"), (120, "early17"), (130, "early39")] {
            h.call(1, "k", KvOp::Get, (t, t + 5), val(Some(seen)));
        }
        for i in 0..40 {
            h.lost(200 + i, "k", set(&format!("late{i}")), 1_000 + i);
        }
        let stats = h.check().expect("linearizable");
        assert!(stats.states_explored < 1_000, "{stats:?}");

        // The same reads, with one that would need early3 a second time.
        h.call(1, "k", KvOp::Get, (140, 145), val(Some("early3")));
        let violation = h.check().expect_err("early3 was overwritten and written only once");
        assert!(!violation.explanation.contains("abandoned"), "{violation}");
    }

    #[test]
    fn abandoned_search_fails_loudly() {
        // Twenty overlapping CAS that change nothing, each with a later
        // call on its connection (so none can stand in for another), then
        // a contradiction found only once all of them are placed: a GET of
        // "a" after the last write of "a" was overwritten. Every subset of
        // the CAS is tried.
        let mut h = H::default();
        h.call(99, "k", set("a"), (0, 1), done(true));
        for i in 0..20 {
            h.call(i, "k", KvOp::Cas { old: b("a"), new: b("a") }, (2, 10), done(true));
        }
        for i in 0..20 {
            h.call(i, "k", set("a"), (20, 21), done(true));
        }
        h.call(98, "k", KvOp::Get, (11, 30), val(Some("b")))
            .call(99, "k", set("b"), (25, 26), done(true))
            .call(97, "k", KvOp::Get, (27, 28), val(Some("a")));
        let violation = check_with(
            &h.history,
            &BTreeMap::new(),
            &CheckOptions { states_per_key_max: 1_000, ..CheckOptions::default() },
        )
        .expect_err("bound");
        assert!(violation.explanation.contains("abandoned"), "{violation}");
        assert!(violation.explanation.contains("too concurrent"), "{violation}");
    }

    /// A history made by running a real sequential map, its initial map,
    /// and when each crashed connection's effects end. Each call takes
    /// effect at a point inside its interval, in order per connection;
    /// connections crash at random, leaving their calls in flight
    /// unanswered (those whose point had passed took effect).
    pub(super) fn generated_history(
        seed: u64,
        calls: usize,
        keys: usize,
        conns: usize,
        crash_chance: f64,
    ) -> (History, BTreeMap<Bytes, Bytes>, BTreeMap<u64, u64>) {
        struct Conn {
            id: u64,
            seq: u64,
            last_point_ns: u64,
            in_flight: Vec<usize>,
        }
        struct Planned {
            range: Option<(usize, usize)>,
            call: Option<usize>,
            point_ns: u64,
            completed_ns: u64,
            happened: bool,
            lost: bool,
        }
        let mut rng = Stream::new(seed, Concern::Workload);
        let key_names: Vec<Bytes> = (0..keys).map(|k| b(&format!("key{k:03}"))).collect();
        let initial: BTreeMap<Bytes, Bytes> = key_names
            .iter()
            .step_by(2)
            .map(|k| (k.clone(), b(&format!("init-{}", k.escape_ascii()))))
            .collect();
        let mut recent: Vec<Vec<Bytes>> =
            key_names.iter().map(|k| initial.get(k).into_iter().cloned().collect()).collect();
        let mut conn_list: Vec<Conn> = (0..conns as u64)
            .map(|id| Conn { id, seq: 0, last_point_ns: 0, in_flight: Vec::new() })
            .collect();
        let mut next_conn_id = conns as u64;
        let mut effects_end_ns = BTreeMap::new();
        let mut history = History::default();
        let mut range_limits = Vec::new();
        let mut planned: Vec<Planned> = Vec::new();
        let mut now_ns = 0;
        for n in 0..calls {
            now_ns += rng.range(1, 150);
            let slot = rng.below(conns as u64) as usize;
            if rng.chance(crash_chance) {
                for &p in &conn_list[slot].in_flight {
                    if planned[p].completed_ns > now_ns {
                        planned[p].lost = true;
                        planned[p].happened = planned[p].point_ns <= now_ns;
                    }
                }
                effects_end_ns.insert(conn_list[slot].id, now_ns);
                conn_list[slot] =
                    Conn { id: next_conn_id, seq: 0, last_point_ns: now_ns, in_flight: Vec::new() };
                next_conn_id += 1;
            }
            let conn = &mut conn_list[slot];
            let seq = conn.seq;
            conn.seq += 1;
            let point_ns = (now_ns + rng.below(3_000)).max(conn.last_point_ns + 1);
            conn.last_point_ns = point_ns;
            let completed_ns = point_ns + rng.below(3_000);
            conn.in_flight.retain(|&p| planned[p].completed_ns > now_ns);
            conn.in_flight.push(planned.len());
            let mut plan =
                Planned { range: None, call: None, point_ns, completed_ns, happened: true, lost: false };
            if rng.chance(0.05) {
                let start = rng.below(keys as u64) as usize;
                let end = rng.range(start as u64, keys as u64) as usize;
                range_limits.push(rng.range(1, 6) as usize);
                history.ranges.push(RangeCall {
                    conn: conn.id,
                    seq,
                    start: key_names[start].clone(),
                    end: key_names.get(end).cloned().unwrap_or_default(),
                    invoked_ns: now_ns,
                    completed_ns,
                    pairs: Vec::new(),
                    next: Bytes::new(),
                });
                plan.range = Some((history.ranges.len() - 1, range_limits.len() - 1));
            } else {
                let k = if rng.chance(0.3) { 0 } else { rng.below(keys as u64) as usize };
                let value = b(&format!("v{n}"));
                let old = {
                    let r = &recent[k];
                    let back = (rng.below(3) as usize).min(r.len());
                    r.len().checked_sub(back + 1).map_or_else(|| b("nope"), |i| r[i].clone())
                };
                let op = match rng.below(100) {
                    0..30 => KvOp::Get,
                    30..50 => KvOp::Set { value: value.clone() },
                    50..62 => KvOp::Cas { old, new: value.clone() },
                    62..72 => KvOp::Add { value: value.clone() },
                    72..80 => KvOp::Modify { value: value.clone() },
                    80..90 => KvOp::Delete,
                    _ => KvOp::Cad { old },
                };
                if matches!(op, KvOp::Set { .. } | KvOp::Cas { .. } | KvOp::Add { .. } | KvOp::Modify { .. })
                {
                    recent[k].push(value);
                }
                history.calls.push(Call {
                    conn: conn.id,
                    seq,
                    key: key_names[k].clone(),
                    op,
                    invoked_ns: now_ns,
                    completed: None,
                });
                plan.call = Some(history.calls.len() - 1);
            }
            planned.push(plan);
        }

        let mut order: Vec<usize> = (0..planned.len()).filter(|&p| planned[p].happened).collect();
        order.sort_by_key(|&p| (planned[p].point_ns, p));
        let mut map = initial.clone();
        for p in order {
            let plan = &planned[p];
            if let Some(c) = plan.call {
                let call = &mut history.calls[c];
                let current = map.get(&call.key).cloned();
                let (next, result) = match &call.op {
                    KvOp::Get => (current.clone(), KvResult::Value(current)),
                    KvOp::Set { value } => (Some(value.clone()), KvResult::Done(true)),
                    KvOp::Cas { old, new } if current.as_ref() == Some(old) => {
                        (Some(new.clone()), KvResult::Done(true))
                    }
                    KvOp::Add { value } if current.is_none() => (Some(value.clone()), KvResult::Done(true)),
                    KvOp::Modify { value } if current.is_some() => {
                        (Some(value.clone()), KvResult::Done(true))
                    }
                    KvOp::Delete => (None, KvResult::Done(true)),
                    KvOp::Cad { old } if current.as_ref() == Some(old) => (None, KvResult::Done(true)),
                    _ => (current, KvResult::Done(false)),
                };
                match next {
                    Some(v) => map.insert(call.key.clone(), v),
                    None => map.remove(&call.key),
                };
                if !plan.lost {
                    call.completed = Some((plan.completed_ns, result));
                }
            }
            if let Some((r, l)) = plan.range {
                let range = &mut history.ranges[r];
                let end = if range.end.is_empty() { None } else { Some(range.end.clone()) };
                let inside: Vec<(Bytes, Bytes)> = map
                    .range(range.start.clone()..)
                    .take_while(|(k, _)| end.as_ref().is_none_or(|e| *k < e))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                if inside.len() > range_limits[l] {
                    range.pairs = inside[..range_limits[l]].to_vec();
                    let mut next = range.pairs.last().expect("limit >= 1").0.to_vec();
                    next.push(0);
                    range.next = Bytes::from(next);
                } else {
                    range.pairs = inside;
                    range.next = range.end.clone();
                }
            }
        }
        let lost_ranges: BTreeSet<usize> =
            planned.iter().filter(|p| p.lost).filter_map(|p| p.range.map(|r| r.0)).collect();
        history.ranges = std::mem::take(&mut history.ranges)
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !lost_ranges.contains(i))
            .map(|(_, r)| r)
            .collect();
        (history, initial, effects_end_ns)
    }

    /// Makes a GET of `history` return a value nothing wrote, returning
    /// its key.
    fn corrupt_a_get(history: &mut History, which: usize) -> Bytes {
        let gets: Vec<usize> = (0..history.calls.len())
            .filter(|&i| history.calls[i].op == KvOp::Get && history.calls[i].completed.is_some())
            .collect();
        let call = &mut history.calls[gets[which % gets.len()]];
        call.completed.as_mut().expect("answered").1 = val(Some("never-written"));
        call.key.clone()
    }

    #[test]
    fn generated_history_passes_and_a_corrupted_read_is_caught() {
        let (mut history, initial, _) = generated_history(1, 2_000, 16, 24, 0.0);
        let stats = check(&history, &initial).expect("generated from a real execution");
        assert_eq!(stats.calls, 2_000);
        // The work, not the time (tests assert no timings): a few states per call.
        assert!(stats.states_explored < 20 * stats.calls as u64, "{stats:?}");

        let key = corrupt_a_get(&mut history, 700);
        let violation = check(&history, &initial).expect_err("a GET saw a value never written");
        assert_eq!(violation.key, key);
        assert!(violation.explanation.contains("never-written"), "{violation}");
    }

    #[test]
    fn generated_history_with_crashes_passes_and_a_corrupted_read_is_caught() {
        for seed in 0..4 {
            let (mut history, initial, _) = generated_history(seed, 2_000, 6, 32, 0.05);
            let lost = history.calls.iter().filter(|c| c.completed.is_none()).count();
            assert!(lost > 50, "seed {seed}: only {lost} unanswered calls");
            let stats = check(&history, &initial).unwrap_or_else(|v| panic!("seed {seed}: {v}"));
            assert!(stats.states_explored < 20 * stats.calls as u64, "seed {seed}: {stats:?}");

            let key = corrupt_a_get(&mut history, 300 + seed as usize);
            let violation = check(&history, &initial).expect_err("a GET saw a value never written");
            assert_eq!(violation.key, key);
            assert!(!violation.explanation.contains("abandoned"), "{violation}");
        }
    }

    #[test]
    fn heavy_crashes_with_known_effect_ends_stay_cheap() {
        for seed in 0..4 {
            // A fifth of the calls crash a connection; a hot key gets a
            // hundred or more unanswered calls.
            let (mut history, initial, effects_end_ns) = generated_history(seed, 2_000, 3, 32, 0.2);
            let lost = history.calls.iter().filter(|c| c.completed.is_none()).count();
            assert!(lost > 300, "seed {seed}: only {lost} unanswered calls");
            let options = CheckOptions { effects_end_ns, ..CheckOptions::default() };
            let stats =
                check_with(&history, &initial, &options).unwrap_or_else(|v| panic!("seed {seed}: {v}"));
            assert!(stats.states_explored < 40 * stats.calls as u64, "seed {seed}: {stats:?}");

            let key = corrupt_a_get(&mut history, 500 + seed as usize);
            let violation =
                check_with(&history, &initial, &options).expect_err("a GET saw a value never written");
            assert_eq!(violation.key, key);
            assert!(!violation.explanation.contains("abandoned"), "{violation}");
        }
    }

    #[test]
    fn effects_end_bounds_unanswered_calls() {
        // SET a was never answered; its connection's effects ended at 10;
        // SET b was acknowledged after; a GET after that sees a.
        let mut h = H::default();
        h.lost(1, "k", set("a"), 0).call(2, "k", set("b"), (12, 15), done(true)).call(
            3,
            "k",
            KvOp::Get,
            (20, 30),
            val(Some("a")),
        );
        h.check().expect("without a bound, SET a may take effect after SET b");
        let options = CheckOptions { effects_end_ns: BTreeMap::from([(1, 10)]), ..CheckOptions::default() };
        let violation =
            check_with(&h.history, &BTreeMap::new(), &options).expect_err("SET a took effect by 10");
        assert!(violation.explanation.contains("may have taken effect by 0.000000010s"), "{violation}");

        // A call sent after its connection's effects end is an error of
        // the caller.
        let mut h = H::default();
        h.lost(1, "k", set("a"), 11);
        let violation = check_with(&h.history, &BTreeMap::new(), &options).expect_err("sent after the end");
        assert!(violation.explanation.starts_with("malformed"), "{violation}");
    }

    /// The definition, by brute force over every subset of unanswered
    /// calls and every order of the chosen calls (one key, no RANGE).
    fn brute_force(calls: &[Call], initial: Option<&Bytes>, effects_end_ns: &BTreeMap<u64, u64>) -> bool {
        let n = calls.len();
        let modifying = |i: usize| calls[i].op != KvOp::Get;
        let same_chain = |a: usize, b: usize| {
            modifying(a) && modifying(b) && calls[a].conn == calls[b].conn && calls[a].seq < calls[b].seq
        };
        // An earlier call on the chain of an answered call took effect.
        let needed = |a: usize| {
            calls[a].completed.is_some() || (0..n).any(|c| same_chain(a, c) && calls[c].completed.is_some())
        };
        let lost: Vec<usize> = (0..n).filter(|&i| calls[i].completed.is_none()).collect();
        for mask in 0..(1u32 << lost.len()) {
            let mut chosen: Vec<usize> = (0..n).filter(|&i| calls[i].completed.is_some()).collect();
            chosen.extend(lost.iter().enumerate().filter(|(j, _)| mask & (1 << j) != 0).map(|(_, &i)| i));
            if (0..n).any(|a| needed(a) && !chosen.contains(&a)) {
                continue;
            }
            let precedes = |a: usize, b: usize| {
                let deadline = calls[a]
                    .completed
                    .as_ref()
                    .map(|(t, _)| *t)
                    .or(effects_end_ns.get(&calls[a].conn).copied());
                deadline.is_some_and(|t| t < calls[b].invoked_ns) || same_chain(a, b)
            };
            if permutations_ok(calls, &mut chosen, 0, &precedes, initial) {
                return true;
            }
        }
        false
    }

    /// Whether some order of `chosen[k..]` after `chosen[..k]` is valid.
    fn permutations_ok(
        calls: &[Call],
        chosen: &mut Vec<usize>,
        k: usize,
        precedes: &dyn Fn(usize, usize) -> bool,
        initial: Option<&Bytes>,
    ) -> bool {
        if k == chosen.len() {
            let order = &chosen[..];
            let before =
                |a: usize, b: usize| order.iter().position(|&x| x == a) < order.iter().position(|&x| x == b);
            for &a in order {
                for &b in order {
                    if precedes(a, b) && !before(a, b) {
                        return false;
                    }
                }
            }
            let mut value = initial.cloned();
            for &i in order {
                let (next, result) = match &calls[i].op {
                    KvOp::Get => (value.clone(), KvResult::Value(value.clone())),
                    KvOp::Set { value } => (Some(value.clone()), done(true)),
                    KvOp::Cas { old, new } if value.as_ref() == Some(old) => (Some(new.clone()), done(true)),
                    KvOp::Add { value: v } if value.is_none() => (Some(v.clone()), done(true)),
                    KvOp::Modify { value: v } if value.is_some() => (Some(v.clone()), done(true)),
                    KvOp::Delete => (None, done(true)),
                    KvOp::Cad { old } if value.as_ref() == Some(old) => (None, done(true)),
                    _ => (value.clone(), done(false)),
                };
                if calls[i].completed.as_ref().is_some_and(|(_, seen)| *seen != result) {
                    return false;
                }
                value = next;
            }
            return true;
        }
        for j in k..chosen.len() {
            chosen.swap(k, j);
            let ok = permutations_ok(calls, chosen, k + 1, precedes, initial);
            chosen.swap(k, j);
            if ok {
                return true;
            }
        }
        false
    }

    #[test]
    fn agrees_with_brute_force_on_small_histories() {
        let mut rng = Stream::new(42, Concern::Workload);
        let values = ["a", "b", "c"];
        let (mut passes, mut fails) = (0, 0);
        for round in 0..3_000 {
            let n = rng.range(1, 7) as usize;
            let mut h = H::default();
            for _ in 0..n {
                let conn = rng.range(1, 3);
                let pick = |rng: &mut Stream| b(values[rng.below(3) as usize]);
                let op = match rng.below(7) {
                    0 => KvOp::Get,
                    1 => KvOp::Set { value: pick(&mut rng) },
                    2 => KvOp::Cas { old: pick(&mut rng), new: pick(&mut rng) },
                    3 => KvOp::Add { value: pick(&mut rng) },
                    4 => KvOp::Modify { value: pick(&mut rng) },
                    5 => KvOp::Delete,
                    _ => KvOp::Cad { old: pick(&mut rng) },
                };
                let invoked_ns = rng.below(20);
                if rng.chance(0.3) {
                    h.lost(conn, "k", op, invoked_ns);
                } else {
                    let result = if op == KvOp::Get {
                        KvResult::Value(rng.chance(0.75).then(|| pick(&mut rng)))
                    } else {
                        KvResult::Done(rng.chance(0.7))
                    };
                    h.call(conn, "k", op, (invoked_ns, invoked_ns + rng.below(10)), result);
                }
            }
            // Sends on a connection are in time order.
            let mut by_conn: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
            for (i, c) in h.history.calls.iter().enumerate() {
                by_conn.entry(c.conn).or_default().push(i);
            }
            for indices in by_conn.values() {
                let mut times: Vec<u64> = indices.iter().map(|&i| h.history.calls[i].invoked_ns).collect();
                times.sort_unstable();
                for (&i, t) in indices.iter().zip(times) {
                    let call = &mut h.history.calls[i];
                    let length = call.completed.as_ref().map(|(c, _)| c - call.invoked_ns);
                    call.invoked_ns = t;
                    if let (Some((c, _)), Some(length)) = (call.completed.as_mut(), length) {
                        *c = t + length;
                    }
                }
            }
            let initial_value = rng.chance(0.5).then(|| b("a"));
            let initial: BTreeMap<Bytes, Bytes> = initial_value.iter().map(|v| (b("k"), v.clone())).collect();
            // Sometimes each connection's effects end soon after its last
            // call was sent.
            let mut options = CheckOptions::default();
            if rng.chance(0.5) {
                for call in &h.history.calls {
                    let end_ns = options.effects_end_ns.entry(call.conn).or_default();
                    *end_ns = (*end_ns).max(call.invoked_ns);
                }
                for end_ns in options.effects_end_ns.values_mut() {
                    *end_ns += rng.below(8);
                }
            }
            let expected = brute_force(&h.history.calls, initial_value.as_ref(), &options.effects_end_ns);
            let got = check_with(&h.history, &initial, &options);
            assert_eq!(
                got.is_ok(),
                expected,
                "round {round}: {:#?}\n{:?}\n{got:?}",
                h.history.calls,
                options.effects_end_ns
            );
            if expected {
                passes += 1;
            } else {
                fails += 1;
            }
        }
        assert!(passes > 200 && fails > 200, "passes {passes}, fails {fails}");
    }
}
