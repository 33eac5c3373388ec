//! Server-sent events as OpenAI streams them: optional prelude chunks, one
//! chunk per generated token across all choices, the usage chunk when asked,
//! then `data: [DONE]`. A failure mid-stream is one error event, then the
//! stream closes. Dropping the response (client gone) drops every choice,
//! which aborts their sequences on the engine.

use crate::frontend::generation::{Choice, Piece};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, BoxStream, SelectAll, StreamExt};
use serde_json::Value;
use std::collections::VecDeque;
use std::convert::Infallible;

/// How to turn pieces into chunks.
pub struct StreamFormat {
    /// Chunks sent before any token (chat role deltas, echoed prompts).
    pub prelude: Vec<Value>,
    /// One chunk per piece.
    pub piece: Box<dyn Fn(&Piece) -> Value + Send>,
    /// With the total completion tokens, the usage chunk (when asked for).
    pub usage: Option<Box<dyn Fn(usize) -> Value + Send>>,
}

enum Phase {
    Prelude,
    Body,
    Usage,
    Done,
    End,
}

struct StreamState {
    prelude: VecDeque<Value>,
    choices: SelectAll<BoxStream<'static, Result<Piece, crate::frontend::error::ApiError>>>,
    fmt: StreamFormat,
    completion_tokens: usize,
    phase: Phase,
}

/// The SSE response for `choices`.
pub fn respond(choices: Vec<Choice>, fmt: StreamFormat) -> Response {
    let merged = stream::select_all(
        choices.into_iter().map(|c| stream::unfold(c, |mut c| async move { c.next().await.map(|p| (p, c)) }).boxed()),
    );
    let state = StreamState {
        prelude: fmt.prelude.clone().into(),
        choices: merged,
        completion_tokens: 0,
        phase: Phase::Prelude,
        fmt,
    };
    let events = stream::unfold(state, |mut s| async move {
        loop {
            match s.phase {
                Phase::Prelude => match s.prelude.pop_front() {
                    Some(v) => return Some((Ok::<_, Infallible>(Event::default().data(v.to_string())), s)),
                    None => s.phase = Phase::Body,
                },
                Phase::Body => match s.choices.next().await {
                    Some(Ok(p)) => {
                        if p.token.is_some() {
                            s.completion_tokens += 1;
                        }
                        let v = (s.fmt.piece)(&p);
                        return Some((Ok(Event::default().data(v.to_string())), s));
                    }
                    Some(Err(e)) => {
                        s.phase = Phase::End;
                        return Some((Ok(Event::default().data(e.body().to_string())), s));
                    }
                    None => s.phase = Phase::Usage,
                },
                Phase::Usage => {
                    s.phase = Phase::Done;
                    if let Some(u) = &s.fmt.usage {
                        let v = u(s.completion_tokens);
                        return Some((Ok(Event::default().data(v.to_string())), s));
                    }
                }
                Phase::Done => {
                    s.phase = Phase::End;
                    return Some((Ok(Event::default().data("[DONE]")), s));
                }
                Phase::End => return None,
            }
        }
    });
    Sse::new(events).into_response()
}
