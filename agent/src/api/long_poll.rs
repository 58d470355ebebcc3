//! Caps on long-polls (`GET /v1/tasks/{id}?wait=SECS`): a long-poll holds a connection slot for
//! up to five minutes, so without a cap a client allowed to read could hold every slot of the
//! listener by waiting on a running task from enough connections.
//!
//! Each client identity (certificate names, or local uid) may hold a few long-polls, readers all
//! together a share, and everyone together well under the connection cap. A wait over the cap is
//! not refused: it is answered at once with the task's current state, which a polling client
//! handles like any early answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{Peer, Role};

/// Long-polls one client identity may hold at once.
pub const PER_CLIENT: usize = 4;
/// Long-polls all readers together may hold at once.
pub const READERS: usize = 32;
/// Long-polls everyone together may hold at once (the connection cap is 512).
pub const TOTAL: usize = 128;

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    readers: usize,
    per_client: HashMap<String, usize>,
}

/// The long-polls being held, shared by every request of a router.
#[derive(Clone, Debug, Default)]
pub struct LongPolls(Arc<Mutex<Counts>>);

/// One long-poll being held; released when dropped.
#[derive(Debug)]
pub struct Held {
    polls: LongPolls,
    client: String,
    reader: bool,
}

/// The identity a long-poll is counted against.
fn identity(peer: &Peer) -> String {
    match peer {
        Peer::Local { uid } => format!("uid:{uid}"),
        Peer::Remote { names } => format!("tls:{}", names.join(",")),
    }
}

impl LongPolls {
    /// Takes a long-poll for `peer`, or `None` if a cap is reached.
    pub fn enter(&self, peer: &Peer, role: Role) -> Option<Held> {
        let reader = role == Role::Reader;
        let client = identity(peer);
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mine = counts.per_client.get(&client).copied().unwrap_or(0);
        if counts.total >= TOTAL || mine >= PER_CLIENT || (reader && counts.readers >= READERS) {
            return None;
        }
        counts.total += 1;
        if reader {
            counts.readers += 1;
        }
        *counts.per_client.entry(client.clone()).or_insert(0) += 1;
        Some(Held {
            polls: self.clone(),
            client,
            reader,
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut counts = self.polls.0.lock().unwrap_or_else(|p| p.into_inner());
        counts.total = counts.total.saturating_sub(1);
        if self.reader {
            counts.readers = counts.readers.saturating_sub(1);
        }
        if let Some(n) = counts.per_client.get_mut(&self.client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.per_client.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(name: &str) -> Peer {
        Peer::Remote {
            names: vec![name.to_owned()],
        }
    }

    #[test]
    fn long_polls_are_capped_per_client_for_readers_and_in_total() {
        let polls = LongPolls::default();
        let a: Vec<Held> = (0..PER_CLIENT)
            .map(|_| {
                polls
                    .enter(&remote("a"), Role::Reader)
                    .expect("under the cap")
            })
            .collect();
        assert!(polls.enter(&remote("a"), Role::Reader).is_none());
        // Another client is not affected by a's share.
        let b = polls.enter(&remote("b"), Role::Operator).expect("b");
        drop(a);
        assert!(polls.enter(&remote("a"), Role::Reader).is_some());
        drop(b);

        // Readers together.
        let readers: Vec<Held> = (0..READERS)
            .map(|i| {
                polls
                    .enter(&remote(&format!("r{}", i / PER_CLIENT)), Role::Reader)
                    .expect("reader share")
            })
            .collect();
        assert!(polls.enter(&remote("late-reader"), Role::Reader).is_none());
        assert!(polls.enter(&remote("operator"), Role::Operator).is_some());

        // Everyone together.
        let operators: Vec<Held> = (0..)
            .map_while(|i| polls.enter(&remote(&format!("o{}", i / PER_CLIENT)), Role::Operator))
            .collect();
        assert_eq!(readers.len() + operators.len(), TOTAL);
        assert!(
            polls
                .enter(&Peer::Local { uid: 0 }, Role::Operator)
                .is_none()
        );
        drop(operators);
        assert!(
            polls
                .enter(&Peer::Local { uid: 0 }, Role::Operator)
                .is_some()
        );
    }
}
