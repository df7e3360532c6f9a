//! The redrive suite (tests/tests/redrive.rs) with the splitter and reducer keeping their
//! state in PostgreSQL: the harness sees `_pg` in this executable's name and gives them a
//! database of the test's own as `BATCHQ_DATABASE_URL` (tests/src/postgres.rs).

#[path = "redrive.rs"]
mod suite;
