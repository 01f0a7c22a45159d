//! Durable container streams: a container process that outlives its stream
//! connection (a shim whose burrowd restarted), taken up again by a
//! `ContainerAttach` stream.
//!
//! A durable process's exec stream runs against in-memory pipes that the agent
//! owns, not against its connection. Connections attach to those pipes one at a
//! time, frame by frame: while none is attached, the process's output waits in
//! the pipes (and the process blocks once they are full); a frame read but not
//! delivered when a connection breaks is the first one the next attachment
//! gets. Output the broken connection had already taken is lost with it.
//!
//! Input: the process's input connection is an in-memory pipe too, fed by each
//! attachment's own input connection. An input connection that breaks does not
//! end the process's input; a `close_stdin` control on it does (burrowd sends
//! one before it closes a stream's input on purpose).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use burrow_proto::{
    AgentError, ErrorKind, FrameError, GuestFrame, HostFrame, StreamControl, StreamEvent,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use crate::process::lock;
use crate::streams::{InputSlot, Inputs, Opened};

/// Bytes the in-memory pipes between a durable process and its connections hold.
const PIPE_BYTES: usize = 256 << 10;
/// Exits kept after delivery, for an attach whose host did not pass one on.
const KEEP_FINISHED: usize = 1024;

/// A durable stream's name: the container's id and the exec's ("" for the
/// container's own process).
pub type Key = (String, String);

/// The durable streams of the agent's containers.
#[derive(Default)]
pub struct Durables {
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    live: HashMap<Key, Arc<Durable>>,
    /// The last event of streams that ended, oldest first in `order`.
    finished: HashMap<Key, StreamEvent>,
    order: VecDeque<Key>,
}

/// One durable process's stream.
pub struct Durable {
    key: Key,
    pid: Option<i32>,
    /// The exec stream's frames, and one read but not yet delivered.
    down: tokio::sync::Mutex<Down>,
    /// Frames for the exec stream: controls and in-band input.
    ctl: mpsc::Sender<HostFrame>,
    /// Frames for the process's input connection; `None` when it takes none.
    input: Option<mpsc::Sender<HostFrame>>,
    /// Counts attachments: an attachment lets go when a newer one comes.
    generation: watch::Sender<u64>,
    _tasks: [AbortOnDrop; 2],
    _input_task: Option<AbortOnDrop>,
}

struct Down {
    rx: mpsc::Receiver<GuestFrame>,
    pending: Option<GuestFrame>,
}

/// A connection's claim on a durable stream, or the replay of one that ended.
pub enum Attachment {
    Live {
        durable: Arc<Durable>,
        /// This attachment's number: it lets go once a newer one is made.
        number: u64,
        /// This attachment's input connection, when the process takes input.
        input: Option<InputSlot>,
        durables: Arc<Durables>,
    },
    Ended(StreamEvent),
}

impl Durables {
    /// Whether `key` names a live durable stream.
    pub fn is_live(&self, key: &Key) -> bool {
        lock(&self.table).live.contains_key(key)
    }

    /// Makes a just-started process's stream (`opened`, not yet run) durable
    /// under `key`, and attaches the connection that opened it.
    pub fn adopt(
        self: &Arc<Self>,
        key: Key,
        opened: Opened,
        inputs: &Arc<Inputs>,
    ) -> Result<Attachment, AgentError> {
        let pid = opened.pid();
        // The process's own input connection is an in-memory pipe from now on.
        let input_pipe = match opened.input_token() {
            Some(token) => match inputs.take(token)? {
                Opened::Input(tx) => {
                    let (rd, wr) = tokio::io::duplex(PIPE_BYTES);
                    let _ = tx.send(Box::new(rd));
                    Some(wr)
                }
                _ => None,
            },
            None => None,
        };
        let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
        let (their_rd, their_wr) = tokio::io::split(theirs);
        tokio::spawn(opened.run(their_rd, their_wr));
        let (mut rd, mut wr) = tokio::io::split(ours);
        let (down_tx, down_rx) = mpsc::channel(1);
        let reader = tokio::spawn(async move {
            while let Ok(f) = GuestFrame::read(&mut rd).await {
                if down_tx.send(f).await.is_err() {
                    return;
                }
            }
        });
        let (ctl_tx, mut ctl_rx) = mpsc::channel::<HostFrame>(4);
        let writer = tokio::spawn(async move {
            while let Some(f) = ctl_rx.recv().await {
                if f.write(&mut wr).await.is_err() {
                    return;
                }
            }
        });
        let (input, input_task) = match input_pipe {
            Some(mut w) => {
                let (tx, mut rx) = mpsc::channel::<HostFrame>(4);
                let task = tokio::spawn(async move {
                    while let Some(f) = rx.recv().await {
                        match f {
                            HostFrame::Stdin(_) => {
                                if f.write(&mut w).await.is_err() {
                                    return;
                                }
                            }
                            // The end of input: the pipe's end.
                            HostFrame::Control(StreamControl::CloseStdin) => {
                                let _ = w.shutdown().await;
                                return;
                            }
                            HostFrame::Control(_) => {}
                        }
                    }
                });
                (Some(tx), Some(AbortOnDrop(task)))
            }
            None => (None, None),
        };
        let durable = Arc::new(Durable {
            key: key.clone(),
            pid,
            down: tokio::sync::Mutex::new(Down {
                rx: down_rx,
                pending: None,
            }),
            ctl: ctl_tx,
            input,
            generation: watch::channel(0).0,
            _tasks: [AbortOnDrop(reader), AbortOnDrop(writer)],
            _input_task: input_task,
        });
        {
            let mut t = lock(&self.table);
            t.finished.remove(&key);
            t.live.insert(key, Arc::clone(&durable));
        }
        Ok(self.attachment(durable, inputs))
    }

    /// A new connection's attachment to the stream `key`.
    pub fn attach(
        self: &Arc<Self>,
        key: &Key,
        inputs: &Arc<Inputs>,
    ) -> Result<Attachment, AgentError> {
        let t = lock(&self.table);
        if let Some(d) = t.live.get(key) {
            let d = Arc::clone(d);
            drop(t);
            return Ok(self.attachment(d, inputs));
        }
        if let Some(ev) = t.finished.get(key) {
            return Ok(Attachment::Ended(ev.clone()));
        }
        let what = if key.1.is_empty() {
            format!("container {:?}", key.0)
        } else {
            format!("exec {:?} of container {:?}", key.1, key.0)
        };
        Err(AgentError::new(
            ErrorKind::NotFound,
            format!("{what}: no durable stream to attach to"),
        ))
    }

    /// A new attachment to `durable`. It is numbered now, before the host hears
    /// of it, so an older attachment delivers nothing the process writes after
    /// that (two attaches at once get two numbers).
    fn attachment(self: &Arc<Self>, durable: Arc<Durable>, inputs: &Arc<Inputs>) -> Attachment {
        let mut number = 0;
        durable.generation.send_modify(|g| {
            *g += 1;
            number = *g;
        });
        let input = durable
            .input
            .as_ref()
            .filter(|tx| !tx.is_closed())
            .map(|_| inputs.register());
        Attachment::Live {
            durable,
            number,
            input,
            durables: Arc::clone(self),
        }
    }

    /// The stream `key` delivered its last event.
    fn finish(&self, key: &Key, last: StreamEvent) {
        let mut t = lock(&self.table);
        t.live.remove(key);
        if t.finished.insert(key.clone(), last).is_none() {
            t.order.push_back(key.clone());
        }
        while t.order.len() > KEEP_FINISHED {
            if let Some(old) = t.order.pop_front() {
                t.finished.remove(&old);
            }
        }
    }

    /// Forgets the streams of a deleted container: a process still running
    /// loses its stream, and with it its life (as an exec whose host went).
    pub fn forget(&self, container: &str) {
        let mut t = lock(&self.table);
        t.live.retain(|k, _| k.0 != container);
        t.finished.retain(|k, _| k.0 != container);
        t.order.retain(|k| k.0 != container);
    }
}

impl Attachment {
    pub fn pid(&self) -> Option<i32> {
        match self {
            Attachment::Live { durable, .. } => durable.pid,
            Attachment::Ended(_) => None,
        }
    }

    pub fn input_token(&self) -> Option<u64> {
        match self {
            Attachment::Live {
                input: Some(slot), ..
            } => Some(slot.token()),
            _ => None,
        }
    }

    /// Carries the stream over this connection until its last event, the
    /// connection's end, or a newer attachment.
    pub async fn run<R, W>(self, mut rd: R, mut wr: W)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send,
    {
        let (durable, mine, input, durables) = match self {
            Attachment::Ended(ev) => {
                let _ = GuestFrame::Event(ev).write(&mut wr).await;
                return;
            }
            Attachment::Live {
                durable,
                number,
                input,
                durables,
            } => (durable, number, input, durables),
        };
        // The input connection lives on its own, to its end: what it carries
        // is the process's even after this stream connection broke (burrowd's
        // last writes before it died).
        if let (Some(slot), Some(tx)) = (input, &durable.input) {
            tokio::spawn(feed_input(slot, tx.clone()));
        }
        let mut newer = durable.generation.subscribe();
        // Waits for the older attachment to let go.
        let mut down = durable.down.lock().await;
        let ctl = durable.ctl.clone();
        let up = async move {
            loop {
                match HostFrame::read(&mut rd).await {
                    Ok(f) => {
                        if ctl.send(f).await.is_err() {
                            return;
                        }
                    }
                    Err(FrameError::Malformed(_)) => continue,
                    Err(_) => return,
                }
            }
        };
        // Cancel-safe: a frame stays pending until it is written.
        let key = &durable.key;
        let deliver = async {
            loop {
                if down.pending.is_none() {
                    down.pending = down.rx.recv().await;
                }
                let Some(frame) = &down.pending else {
                    return true;
                };
                // The last event is kept before it goes out: an attach that
                // comes once the host has it, or after this write failed,
                // finds it there.
                if let GuestFrame::Event(e) = frame {
                    if e.is_last() {
                        durables.finish(key, e.clone());
                    }
                }
                if frame.write(&mut wr).await.is_err() {
                    return false;
                }
                if let Some(GuestFrame::Event(e)) = down.pending.take() {
                    if e.is_last() {
                        return false;
                    }
                }
            }
        };
        let over = tokio::select! {
            // A newer attachment first: no frame goes out here once it exists.
            biased;
            _ = newer.wait_for(|g| *g != mine) => false,
            over = deliver => over,
            _ = up => false,
        };
        if over {
            // The stream was over before this attachment got to it (an older
            // one delivered its last event meanwhile, which is kept), or it
            // ended without one (then there is nothing to replay).
            let last = lock(&durables.table).finished.get(key).cloned();
            match last {
                Some(ev) => {
                    let _ = GuestFrame::Event(ev).write(&mut wr).await;
                }
                None => {
                    lock(&durables.table).live.remove(key);
                }
            }
        }
    }
}

/// Passes an attachment's input connection on to the process's input, until
/// the connection ends (which ends nothing) or says `close_stdin`.
async fn feed_input(slot: InputSlot, tx: mpsc::Sender<HostFrame>) {
    let Some(mut rd) = slot.connection().await else {
        return;
    };
    loop {
        match HostFrame::read(&mut rd).await {
            Ok(f @ HostFrame::Stdin(_)) | Ok(f @ HostFrame::Control(StreamControl::CloseStdin)) => {
                let last = matches!(f, HostFrame::Control(_));
                if tx.send(f).await.is_err() || last {
                    return;
                }
            }
            Ok(HostFrame::Control(_)) | Err(FrameError::Malformed(_)) => continue,
            Err(_) => return,
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
