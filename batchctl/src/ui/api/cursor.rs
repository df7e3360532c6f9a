//! Pagination of the API's lists: an opaque cursor, and pages that stay whole while the list
//! changes under them.
//!
//! The reducer pages by offset. Between two requests, jobs are submitted (they sort first)
//! and deleted, which would move a bare offset and repeat or skip entries. So a cursor holds
//! the offset *and* the sort key of the last entry handed out: the next page reads from a
//! little before that offset and keeps only entries that sort after that key. Insertions of
//! any number and removals of up to [`SLACK`] entries before the cursor repeat and skip
//! nothing.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// How far before its offset a cursor's next page starts reading.
const SLACK: u64 = 64;
/// Most entries one read asks of the reducer: the most it answers.
const MOST_PER_READ: u32 = batchq_reducer::rpc::MAX_CONSOLE_PAGE;
/// Most reads of the reducer for one page: past this (thousands of jobs submitted between
/// two requests) the page is returned short, with a cursor where the reading stopped.
const MAX_READS: usize = 8;

/// Where the next page starts: `o`, the offset after the last entry handed out; `k`, that
/// entry's sort key; `q`, the query the cursor belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Cursor<K> {
    o: u64,
    k: Option<K>,
    q: String,
}

/// Why a cursor is refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub(crate) enum CursorProblem {
    #[error("cursor is not one this API gave")]
    Unreadable,
    #[error(
        "cursor belongs to another query (its state, prefix or q differ): start again without it"
    )]
    OtherQuery,
}

impl<K: Serialize + DeserializeOwned> Cursor<K> {
    /// The text clients pass back (hex of JSON: URL-safe, and opaque by contract).
    pub(crate) fn encode(&self) -> String {
        hex::encode(serde_json::to_vec(self).unwrap_or_default())
    }

    /// The cursor in `text`, which must belong to `query`.
    pub(crate) fn decode(text: &str, query: &str) -> Result<Self, CursorProblem> {
        let bytes = hex::decode(text.trim()).map_err(|_| CursorProblem::Unreadable)?;
        let cursor: Self = serde_json::from_slice(&bytes).map_err(|_| CursorProblem::Unreadable)?;
        if cursor.q != query {
            return Err(CursorProblem::OtherQuery);
        }
        Ok(cursor)
    }
}

/// One page of at most `limit` entries after `cursor` (or from the start), read from `fetch`
/// (`offset`, `limit` → entries in sort order, fewer than asked only at the end), with the
/// cursor of the next page if there are more. `key` is each entry's position in the order:
/// ascending along the list.
pub(crate) async fn page<T, K, E, F>(
    limit: u32,
    cursor: Option<Cursor<K>>,
    query: &str,
    mut fetch: impl FnMut(u64, u32) -> F,
    key: impl Fn(&T) -> K,
) -> Result<(Vec<T>, Option<Cursor<K>>), E>
where
    K: Ord + Clone,
    F: std::future::Future<Output = Result<Vec<T>, E>>,
{
    let (mut offset, after) = match cursor {
        Some(cursor) => (cursor.o.saturating_sub(SLACK), cursor.k),
        None => (0, None),
    };
    let want = limit as usize;
    // One more than the page, to know whether another page follows.
    let read = limit
        .saturating_add(1)
        .saturating_add(SLACK as u32)
        .min(MOST_PER_READ);
    let mut kept: Vec<(u64, T)> = Vec::new();
    for _ in 0..MAX_READS {
        let entries = fetch(offset, read).await?;
        let at_end = entries.len() < read as usize;
        for (i, entry) in entries.into_iter().enumerate() {
            if after.as_ref().is_none_or(|after| key(&entry) > *after) {
                kept.push((offset + i as u64, entry));
            }
        }
        offset += u64::from(read);
        if at_end || kept.len() > want {
            let more = kept.len() > want;
            kept.truncate(want);
            let next = more.then(|| next_cursor(&kept, &after, offset, query, &key));
            return Ok((kept.into_iter().map(|(_, t)| t).collect(), next));
        }
    }
    // Still short of a page: hand out what was found, and resume where the reading stopped.
    let next = next_cursor(&kept, &after, offset, query, &key);
    Ok((kept.into_iter().map(|(_, t)| t).collect(), Some(next)))
}

fn next_cursor<T, K: Clone>(
    kept: &[(u64, T)],
    after: &Option<K>,
    read_to: u64,
    query: &str,
    key: &impl Fn(&T) -> K,
) -> Cursor<K> {
    match kept.last() {
        Some((at, last)) => Cursor {
            o: at + 1,
            k: Some(key(last)),
            q: query.to_owned(),
        },
        None => Cursor {
            o: read_to,
            k: after.clone(),
            q: query.to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages of `list` (ascending), read through [`page`] from a reader that, as the
    /// reducer, answers at most [`MOST_PER_READ`] entries a read.
    async fn read(
        list: &[u64],
        limit: u32,
        cursor: Option<Cursor<u64>>,
    ) -> (Vec<u64>, Option<Cursor<u64>>) {
        let fetch = |offset: u64, limit: u32| {
            let entries: Vec<u64> = list
                .iter()
                .skip(offset as usize)
                .take(limit.min(MOST_PER_READ) as usize)
                .copied()
                .collect();
            std::future::ready(Ok::<_, ()>(entries))
        };
        page(limit, cursor, "q", fetch, |n| *n).await.expect("read")
    }

    #[tokio::test]
    async fn pages_cover_the_list_once() {
        for (n, limit) in [
            (250, 7),
            (1234, MOST_PER_READ),
            (MOST_PER_READ as u64, MOST_PER_READ),
        ] {
            let list: Vec<u64> = (0..n).collect();
            let mut seen = Vec::new();
            let mut cursor = None;
            loop {
                let (entries, next) = read(&list, limit, cursor).await;
                assert!(entries.len() <= limit as usize);
                assert!(
                    next.is_none() || entries.len() == limit as usize,
                    "a short page before the end"
                );
                seen.extend(entries);
                match next {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
            assert_eq!(seen, list, "{n} entries, {limit} a page");
        }
    }

    #[tokio::test]
    async fn entries_added_or_removed_before_the_cursor_move_nothing() {
        let list: Vec<u64> = (100..200).collect();
        let (first, next) = read(&list, 10, None).await;
        assert_eq!(first, (100..110).collect::<Vec<_>>());
        // Ten entries sort before the cursor now, and three it had passed are gone.
        let mut changed: Vec<u64> = (0..10).collect();
        changed.extend((100..200).filter(|n| ![101, 103, 105].contains(n)));
        let (second, _) = read(&changed, 10, next).await;
        assert_eq!(second, (110..120).collect::<Vec<_>>());
    }

    #[test]
    fn a_cursor_is_opaque_and_tied_to_its_query() {
        let cursor = Cursor {
            o: 5,
            k: Some(4u64),
            q: "state=failed".into(),
        };
        let text = cursor.encode();
        assert!(text.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(Cursor::<u64>::decode(&text, "state=failed"), Ok(cursor));
        assert_eq!(
            Cursor::<u64>::decode(&text, "state=running"),
            Err(CursorProblem::OtherQuery)
        );
        assert_eq!(
            Cursor::<u64>::decode("zz", "state=failed"),
            Err(CursorProblem::Unreadable)
        );
    }
}
