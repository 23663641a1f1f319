//! `muxctl top`: a live dashboard of the daemon's upstream connections.
//!
//! Split the way the rest of muxd is: [`TopState`] is a pure model that ingests one
//! [`StatusReport`] at a time (with the wall-clock time passed in), [`render`] draws a model
//! into any ratatui [`Frame`], and [`run`] is the thin loop that owns the terminal, the timer and
//! the key events. Tests drive the first two with a `TestBackend`.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use anyhow::{Context, bail};
use crossterm::event::{
    Event as TermEvent, EventStream, KeyCode, KeyEvent, KeyEventKind, KeyModifiers,
};
use futures_util::StreamExt;
use muxd_ipc_client::{Client, ClientError};
use muxd_ipc_proto::{StatusReport, UpstreamStatus};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Paragraph, Row, Sparkline, Table};
use ratatui::{DefaultTerminal, Frame};

use crate::{human_duration, since, unix_ms_now};

/// RTT samples kept per server: two minutes at the default one-second refresh, and wider than
/// most terminals, so the sparkline is always full once the dashboard has run a while.
const HISTORY: usize = 120;

/// Width of the label column beside each sparkline.
const LABEL_WIDTH: u16 = 28;

/// The most rows one server's sparkline gets; more only stretches the same 8 levels.
const MAX_SPARK_HEIGHT: u16 = 3;

/// The daemon-wide part of the latest report.
#[derive(Debug, Clone)]
struct Header {
    daemon_version: String,
    pid: u32,
    uptime_ms: u64,
    clients: u32,
}

/// One server: its latest status and its RTT history, oldest first. `None` marks a refresh
/// without a sample, so outages show as gaps rather than as a flat line.
#[derive(Debug, Clone)]
struct ServerView {
    status: UpstreamStatus,
    history: VecDeque<Option<u64>>,
}

/// What the dashboard shows: the latest report plus per-server RTT history.
#[derive(Debug, Clone)]
pub(crate) struct TopState {
    interval: Duration,
    header: Option<Header>,
    /// Keyed by server address, which also gives a stable row order whatever order the daemon
    /// lists its upstreams in.
    servers: BTreeMap<String, ServerView>,
    /// Unix time (ms) of the latest report, for the "since" column.
    now_unix_ms: u64,
    /// Why the latest refresh failed, if it did; the previous data stays on screen.
    error: Option<String>,
}

impl TopState {
    /// An empty dashboard that will say it refreshes every `interval`.
    pub(crate) fn new(interval: Duration) -> Self {
        Self {
            interval,
            header: None,
            servers: BTreeMap::new(),
            now_unix_ms: 0,
            error: None,
        }
    }

    /// Takes in one status report received at `now_unix_ms`.
    ///
    /// Servers missing from the report are dropped with their history: the daemon no longer
    /// holds a connection to them.
    pub(crate) fn ingest(&mut self, report: StatusReport, now_unix_ms: u64) {
        let mut servers = BTreeMap::new();
        for status in report.upstreams {
            let mut view = self
                .servers
                .remove(&status.server)
                .unwrap_or_else(|| ServerView {
                    status: UpstreamStatus::default(),
                    history: VecDeque::with_capacity(HISTORY),
                });
            if view.history.len() == HISTORY {
                view.history.pop_front();
            }
            view.history.push_back(rtt_sample(&status));
            view.status = status;
            servers.insert(view.status.server.clone(), view);
        }
        self.servers = servers;
        self.header = Some(Header {
            daemon_version: report.daemon_version,
            pid: report.pid,
            uptime_ms: report.uptime_ms,
            clients: report.clients,
        });
        self.now_unix_ms = now_unix_ms;
        self.error = None;
    }

    /// Records a failed refresh; the last good data stays on screen.
    pub(crate) fn set_error(&mut self, error: String) {
        self.error = Some(error);
    }
}

/// The sample a report contributes to a server's sparkline, in microseconds.
///
/// A connection that is not up has no live RTT: whatever the daemon still reports from before
/// the drop would draw a flat line across the outage, so it counts as no sample.
fn rtt_sample(u: &UpstreamStatus) -> Option<u64> {
    if u.state != "up" {
        return None;
    }
    u.rtt_last_us
        .or_else(|| u.lag.as_ref().filter(|l| l.count > 0).map(|l| l.p50_us))
}

fn state_style(state: &str) -> Style {
    let color = match state {
        "up" => Color::Green,
        "connecting" | "handshaking" | "backing_off" => Color::Yellow,
        "lost" | "failed" => Color::Red,
        _ => return Style::default(),
    };
    Style::default().fg(color)
}

fn ms(us: u64) -> String {
    format!("{:.1}", us as f64 / 1e3)
}

fn opt_ms(us: Option<u64>) -> String {
    us.map_or_else(|| "-".into(), ms)
}

/// The server as the sparkline label shows it: the key hash says nothing at a glance and the
/// label is narrow, so only `host:port` is kept.
fn short_server(server: &str) -> &str {
    server.rsplit_once('@').map_or(server, |(_, host)| host)
}

/// Draws `state` over the whole frame.
pub(crate) fn render(frame: &mut Frame<'_>, state: &TopState) {
    let n = state.servers.len() as u16;
    // Borders (2) + header row (1) + one row per server, or one for "no upstream connections".
    let table_height = 3 + n.max(1);
    let [header, table, sparks, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(table_height),
        Constraint::Min(0),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    render_header(frame, header, state);
    render_table(frame, table, state);
    render_sparklines(frame, sparks, state);
    render_footer(frame, footer, state);
}

fn render_header(frame: &mut Frame<'_>, area: Rect, state: &TopState) {
    let line = match &state.header {
        Some(h) => Line::from(vec![
            Span::styled(
                format!("muxd {}", h.daemon_version),
                Style::default().add_modifier(Modifier::BOLD),
            ),
            Span::raw(format!(
                " · pid {} · up {} · {} clients · {} upstreams",
                h.pid,
                human_duration(h.uptime_ms),
                h.clients,
                state.servers.len()
            )),
        ]),
        None => Line::from("waiting for the daemon's status…"),
    };
    frame.render_widget(Paragraph::new(line), area);
}

/// The table's columns, left to right.
const HEADERS: [&str; 13] = [
    "SERVER",
    "PROFILE",
    "TRANSPORT",
    "STATE",
    "SINCE",
    "LAST ms",
    "P50 ms",
    "P95 ms",
    "ATTEMPT",
    "RETRY IN",
    "QUEUES",
    "PENDING",
    "LAST ERROR",
];

/// Index of the STATE column, the one that is coloured.
const STATE_COL: usize = 3;

/// Index of the LAST ERROR column, which takes whatever width is left.
const ERROR_COL: usize = 12;

/// Columns given up, in this order, when the terminal is too narrow for all of them. Server,
/// state, the latest RTT and the error are what the dashboard is for and always stay.
const DROP_ORDER: [usize; 9] = [1, 10, 11, 2, 7, 8, 4, 9, 6];

/// Columns are this far apart.
const COLUMN_SPACING: u16 = 2;

/// Width kept for the last error before other columns are dropped to make room for it.
const MIN_ERROR_WIDTH: u16 = 12;

/// The server as the table shows it: a key hash is 44 characters of noise, so it is cut to
/// its first 8, which still tell two keys for one host apart.
fn table_server(server: &str) -> String {
    let Some((scheme, rest)) = server.split_once("://") else {
        return server.to_owned();
    };
    match rest.split_once('@') {
        Some((key, host)) if key.chars().count() > 9 => {
            let head: String = key.chars().take(8).collect();
            format!("{scheme}://{head}…@{host}")
        }
        _ => server.to_owned(),
    }
}

fn table_row(u: &UpstreamStatus, now_unix_ms: u64) -> [String; 13] {
    let lag = u.lag.as_ref().filter(|l| l.count > 0);
    [
        table_server(&u.server),
        u.profile.clone(),
        u.transport.clone(),
        u.state.clone(),
        since(u, now_unix_ms),
        opt_ms(u.rtt_last_us),
        opt_ms(lag.map(|l| l.p50_us)),
        opt_ms(lag.map(|l| l.p95_us)),
        u.attempt.to_string(),
        u.next_retry_ms
            .map_or_else(|| "-".into(), |ms| format!("{:.1}s", ms as f64 / 1e3)),
        u.queues.to_string(),
        u.pending.to_string(),
        u.last_error.clone().unwrap_or_else(|| "-".into()),
    ]
}

/// Which columns fit in `width`, given each column's natural width.
fn visible_columns(widths: &[u16; 13], width: u16) -> Vec<usize> {
    let mut shown: Vec<usize> = (0..HEADERS.len()).collect();
    let needed = |shown: &[usize]| -> u32 {
        let cols: u32 = shown
            .iter()
            .map(|&i| {
                u32::from(if i == ERROR_COL {
                    MIN_ERROR_WIDTH
                } else {
                    widths[i]
                })
            })
            .sum();
        cols + u32::from(COLUMN_SPACING) * (shown.len() as u32).saturating_sub(1)
    };
    for drop in DROP_ORDER {
        if needed(&shown) <= u32::from(width) {
            break;
        }
        shown.retain(|&i| i != drop);
    }
    shown
}

fn render_table(frame: &mut Frame<'_>, area: Rect, state: &TopState) {
    let rows: Vec<[String; 13]> = state
        .servers
        .values()
        .map(|v| table_row(&v.status, state.now_unix_ms))
        .collect();
    // Every column as wide as its widest cell; the last error takes what is left.
    let mut widths = HEADERS.map(|h| h.chars().count() as u16);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count() as u16);
        }
    }
    let block = Block::bordered().title(" upstreams ");
    let shown = visible_columns(&widths, block.inner(area).width);
    let constraints: Vec<Constraint> = shown
        .iter()
        .map(|&i| {
            if i == ERROR_COL {
                Constraint::Fill(1)
            } else {
                Constraint::Length(widths[i])
            }
        })
        .collect();
    let header = Row::new(shown.iter().map(|&i| HEADERS[i]))
        .style(Style::default().add_modifier(Modifier::BOLD));
    let empty = rows.is_empty();
    let body: Vec<Row<'_>> = rows
        .into_iter()
        .map(|mut cells| {
            Row::new(shown.iter().map(|&i| {
                let text = std::mem::take(&mut cells[i]);
                let style = if i == STATE_COL {
                    state_style(&text)
                } else {
                    Style::default()
                };
                Cell::from(text).style(style)
            }))
        })
        .collect();
    let inner = block.inner(area);
    let table = Table::new(body, constraints)
        .header(header)
        .column_spacing(COLUMN_SPACING)
        .block(block);
    frame.render_widget(table, area);
    if empty {
        // Spans all columns, which a table cell cannot.
        let [_, row] =
            Layout::vertical([Constraint::Length(1), Constraint::Length(1)]).areas(inner);
        frame.render_widget(Paragraph::new("no upstream connections"), row);
    }
}

fn render_sparklines(frame: &mut Frame<'_>, area: Rect, state: &TopState) {
    let block = Block::bordered().title(" round-trip time, newest on the right ");
    let inner = block.inner(area);
    frame.render_widget(block, area);
    if state.servers.is_empty() || inner.height == 0 {
        return;
    }
    let n = state.servers.len() as u16;
    let per_server = (inner.height / n).clamp(1, MAX_SPARK_HEIGHT);
    let rows = Layout::vertical(
        state
            .servers
            .values()
            .map(|_| Constraint::Length(per_server)),
    )
    .split(inner);
    for (view, &row) in state.servers.values().zip(rows.iter()) {
        let [label_area, spark_area] =
            Layout::horizontal([Constraint::Length(LABEL_WIDTH), Constraint::Fill(1)])
                .spacing(1)
                .areas(row);
        let samples: Vec<u64> = view.history.iter().flatten().copied().collect();
        let mut label = vec![Line::from(Span::styled(
            short_server(&view.status.server).to_owned(),
            state_style(&view.status.state),
        ))];
        if let (Some(min), Some(max)) = (samples.iter().min(), samples.iter().max()) {
            label.push(Line::from(format!("{}–{} ms", ms(*min), ms(*max))));
        }
        frame.render_widget(Paragraph::new(label), label_area);
        if samples.is_empty() {
            frame.render_widget(
                Paragraph::new("no samples yet").style(Style::default().fg(Color::DarkGray)),
                spark_area,
            );
            continue;
        }
        // The widget draws from the left and drops what does not fit, so hand it only the
        // newest samples that fit.
        let width = usize::from(spark_area.width);
        let skip = view.history.len().saturating_sub(width);
        let data: Vec<Option<u64>> = view.history.iter().skip(skip).copied().collect();
        frame.render_widget(
            Sparkline::default()
                .data(data)
                .style(Style::default().fg(Color::Cyan)),
            spark_area,
        );
    }
}

fn render_footer(frame: &mut Frame<'_>, area: Rect, state: &TopState) {
    let mut spans = vec![Span::raw(format!(
        "q quit · refreshed every {}s",
        state.interval.as_secs_f64()
    ))];
    if let Some(e) = &state.error {
        spans.push(Span::styled(
            format!(" · refresh failed: {e}"),
            Style::default().fg(Color::Red),
        ));
    }
    frame.render_widget(Paragraph::new(Line::from(spans)), area);
}

/// What a terminal event asks of the loop.
#[derive(Debug, PartialEq, Eq)]
enum Action {
    Quit,
    Redraw,
    Nothing,
}

fn action(ev: &TermEvent) -> Action {
    match ev {
        TermEvent::Key(KeyEvent {
            code,
            modifiers,
            kind: KeyEventKind::Press,
            ..
        }) => match code {
            KeyCode::Char('q' | 'Q') | KeyCode::Esc => Action::Quit,
            // Raw mode turns Ctrl-C into a key press instead of SIGINT.
            KeyCode::Char('c') if modifiers.contains(KeyModifiers::CONTROL) => Action::Quit,
            _ => Action::Nothing,
        },
        TermEvent::Resize(..) => Action::Redraw,
        _ => Action::Nothing,
    }
}

/// Raw mode and the alternate screen for as long as it lives. Dropping it restores the
/// terminal on every way out of [`run`], `?` included; ratatui's panic hook covers panics.
struct TerminalGuard {
    terminal: DefaultTerminal,
}

impl std::fmt::Debug for TerminalGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TerminalGuard")
    }
}

impl TerminalGuard {
    fn enter() -> anyhow::Result<Self> {
        match ratatui::try_init() {
            Ok(terminal) => Ok(Self { terminal }),
            Err(e) => {
                // Raw mode may already be on when entering the alternate screen failed.
                let _ = ratatui::try_restore();
                Err(anyhow::Error::new(e).context("cannot set up the terminal"))
            }
        }
    }

    fn draw(&mut self, state: &TopState) -> anyhow::Result<()> {
        self.terminal
            .draw(|f| render(f, state))
            .context("cannot draw to the terminal")?;
        Ok(())
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        // Nothing useful to do if this fails: the process is on its way out.
        let _ = ratatui::try_restore();
    }
}

/// Runs the dashboard until the user quits or the daemon goes away.
pub(crate) async fn run(mut client: Client, interval: f64) -> anyhow::Result<()> {
    if !interval.is_finite() || interval <= 0.0 {
        bail!("invalid interval {interval}: must be a positive number of seconds");
    }
    let period = Duration::from_secs_f64(interval);
    let mut state = TopState::new(period);
    let mut term = TerminalGuard::enter()?;
    let mut events = EventStream::new();
    let mut tick = tokio::time::interval(period);
    // After a slow refresh, wait a whole period again rather than refreshing in a burst.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                // Keys still work while a refresh is outstanding: a stuck daemon must not
                // make `q` stop working.
                let fetch = client.status();
                tokio::pin!(fetch);
                let result = loop {
                    tokio::select! {
                        r = &mut fetch => break r,
                        ev = events.next() => match ev {
                            Some(Ok(ev)) if action(&ev) == Action::Quit => return Ok(()),
                            Some(Ok(_)) => {}
                            Some(Err(e)) => return Err(anyhow::Error::new(e).context("cannot read the terminal")),
                            None => return Ok(()),
                        },
                    }
                };
                match result {
                    Ok(report) => state.ingest(report, unix_ms_now()),
                    // The connection is gone: nothing more will come. Flattened to text on
                    // purpose: main treats an io::Error of kind BrokenPipe in the chain as
                    // "stdout's reader left" and exits 0, but here the daemon went away.
                    Err(e @ (ClientError::Closed | ClientError::Io(_))) => {
                        bail!("lost the connection to muxd: {e}");
                    }
                    Err(e) => state.set_error(e.to_string()),
                }
                term.draw(&state)?;
            }
            ev = events.next() => match ev {
                Some(Ok(ev)) => match action(&ev) {
                    Action::Quit => return Ok(()),
                    Action::Redraw => term.draw(&state)?,
                    Action::Nothing => {}
                },
                Some(Err(e)) => return Err(anyhow::Error::new(e).context("cannot read the terminal")),
                // stdin is gone; nobody can press q any more.
                None => return Ok(()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use muxd_ipc_proto::LagSummary;
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    const SERVER_A: &str = "smp://k@a.example:5223";
    const SERVER_B: &str = "smp://k@b.example:443";

    fn up(server: &str, rtt_us: u64) -> UpstreamStatus {
        UpstreamStatus {
            server: server.into(),
            profile: "smp".into(),
            transport: "tls".into(),
            state: "up".into(),
            state_since_unix_ms: 1_000_000,
            queues: 3,
            pending: 1,
            rtt_last_us: Some(rtt_us),
            lag: Some(LagSummary {
                count: 3,
                min_us: 900,
                p50_us: 1_200,
                p95_us: 2_250,
                max_us: 2_250,
                mean_us: 1_450,
                jitter_us: 700,
            }),
            ..UpstreamStatus::default()
        }
    }

    fn backing_off(server: &str) -> UpstreamStatus {
        UpstreamStatus {
            server: server.into(),
            profile: "smp".into(),
            transport: "websocket".into(),
            state: "backing_off".into(),
            state_since_unix_ms: 1_055_000,
            last_error: Some("connection refused".into()),
            attempt: 4,
            next_retry_ms: Some(3_250),
            ..UpstreamStatus::default()
        }
    }

    fn report(upstreams: Vec<UpstreamStatus>) -> StatusReport {
        StatusReport {
            daemon_version: "0.1.0".into(),
            pid: 77,
            uptime_ms: 61_000,
            clients: 2,
            upstreams,
        }
    }

    /// Renders `state` into a `w`×`h` test terminal; returns the buffer's lines and the
    /// buffer itself (for styles).
    fn draw(state: &TopState, w: u16, h: u16) -> (Vec<String>, ratatui::buffer::Buffer) {
        let mut terminal = Terminal::new(TestBackend::new(w, h)).unwrap();
        terminal.draw(|f| render(f, state)).unwrap();
        let buf = terminal.backend().buffer().clone();
        let lines = (0..h)
            .map(|y| (0..w).map(|x| buf[(x, y)].symbol()).collect::<String>())
            .collect();
        (lines, buf)
    }

    fn line_with<'a>(lines: &'a [String], needle: &str) -> &'a str {
        lines
            .iter()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line contains {needle:?}:\n{}", lines.join("\n")))
    }

    const BARS: &[char] = &['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

    #[test]
    fn shows_state_rtt_and_sparkline() {
        let mut st = TopState::new(Duration::from_secs(1));
        // Three refreshes: A's RTT rises, B stays down throughout.
        for (i, rtt) in [1_000u64, 4_000, 8_000].into_iter().enumerate() {
            st.ingest(
                report(vec![backing_off(SERVER_B), up(SERVER_A, rtt)]),
                1_060_000 + i as u64 * 1000,
            );
        }
        let (lines, buf) = draw(&st, 200, 24);
        let text = lines.join("\n");

        assert!(lines[0].contains("muxd 0.1.0 · pid 77 · up 1m01s · 2 clients · 2 upstreams"));
        // Rows are sorted by server, whatever order the daemon used.
        let a_row = lines.iter().position(|l| l.contains(SERVER_A)).unwrap();
        let b_row = lines.iter().position(|l| l.contains(SERVER_B)).unwrap();
        assert!(a_row < b_row, "{text}");

        let a = line_with(&lines, SERVER_A);
        let cells: Vec<&str> = a.split_whitespace().collect();
        // server profile transport state since(2 words) last p50 p95 attempt retry queues pending error
        assert_eq!(
            cells[1..14],
            [
                "smp", "tls", "up", "1m02s", "ago", "8.0", "1.2", "2.2", "0", "-", "3", "1", "-"
            ],
            "{a}"
        );
        let b = line_with(&lines, SERVER_B);
        assert!(b.contains("backing_off"), "{b}");
        assert!(b.contains("3.2s"), "{b}");
        assert!(b.contains("connection refused"), "{b}");

        // The state cells are coloured.
        let column =
            |line: &str, needle: &str| line[..line.find(needle).unwrap()].chars().count() as u16;
        assert_eq!(buf[(column(a, " up ") + 1, a_row as u16)].fg, Color::Green);
        assert_eq!(
            buf[(column(b, "backing_off"), b_row as u16)].fg,
            Color::Yellow
        );
        // ... and only they are.
        assert_eq!(buf[(column(a, "tls"), a_row as u16)].fg, Color::Reset);

        // A's sparkline: its label, the sample range, and three rising bars ending full.
        let label_row = lines
            .iter()
            .rposition(|l| l.contains("a.example:5223"))
            .unwrap();
        assert!(label_row > b_row, "{text}");
        let spark: String = lines[label_row..label_row + 3]
            .iter()
            .flat_map(|l| l.chars().filter(|c| BARS.contains(c)))
            .collect();
        assert!(spark.contains('█'), "{text}");
        assert!(
            spark.chars().any(|c| c != '█'),
            "bars should differ in height:\n{text}"
        );
        assert!(line_with(&lines, "1.0–8.0 ms").contains("1.0–8.0 ms"));
        // B was never up: no sparkline, and it says so.
        let b_label = lines
            .iter()
            .rposition(|l| l.contains("b.example:443"))
            .unwrap();
        assert!(lines[b_label].contains("no samples yet"), "{text}");
        assert!(!lines[b_label].chars().any(|c| BARS.contains(&c)), "{text}");

        assert!(
            lines[23].starts_with("q quit · refreshed every 1s"),
            "{text}"
        );
    }

    #[test]
    fn missing_lag_shows_dashes() {
        let mut st = TopState::new(Duration::from_millis(500));
        let mut u = up(SERVER_A, 0);
        u.rtt_last_us = None;
        u.lag = None;
        st.ingest(report(vec![u]), 1_060_000);
        let (lines, _) = draw(&st, 200, 16);
        let a = line_with(&lines, SERVER_A);
        let cells: Vec<&str> = a.split_whitespace().collect();
        assert_eq!(cells[6..9], ["-", "-", "-"], "{a}");
        let label = lines
            .iter()
            .rfind(|l| l.contains("a.example:5223"))
            .unwrap();
        assert!(label.contains("no samples yet"), "{label}");
        assert!(!lines.concat().chars().any(|c| BARS.contains(&c)));
        assert!(lines[15].starts_with("q quit · refreshed every 0.5s"));
    }

    #[test]
    fn p50_stands_in_for_a_missing_last_sample() {
        let mut u = up(SERVER_A, 0);
        u.rtt_last_us = None;
        assert_eq!(rtt_sample(&u), Some(1_200));
        u.state = "lost".into();
        assert_eq!(rtt_sample(&u), None, "a dropped connection has no live RTT");
    }

    #[test]
    fn history_is_bounded_and_follows_the_servers() {
        let mut st = TopState::new(Duration::from_secs(1));
        for i in 0..(HISTORY as u64 + 10) {
            st.ingest(report(vec![up(SERVER_A, 1_000 + i)]), i);
        }
        let hist = &st.servers[SERVER_A].history;
        assert_eq!(hist.len(), HISTORY);
        assert_eq!(hist.front(), Some(&Some(1_010)));
        assert_eq!(hist.back(), Some(&Some(1_000 + HISTORY as u64 + 9)));

        // A server the daemon no longer reports disappears, and comes back without history.
        st.ingest(report(vec![up(SERVER_B, 5)]), 0);
        assert!(!st.servers.contains_key(SERVER_A));
        st.ingest(report(vec![up(SERVER_A, 7), up(SERVER_B, 5)]), 0);
        assert_eq!(st.servers[SERVER_A].history.len(), 1);
        assert_eq!(st.servers[SERVER_B].history.len(), 2);
    }

    #[test]
    fn sparkline_shows_the_newest_samples() {
        let mut st = TopState::new(Duration::from_secs(1));
        // Old samples are all high, the newest ones low; a narrow terminal must show the low
        // ones (right end), not the oldest that the widget would otherwise keep.
        for _ in 0..100 {
            st.ingest(report(vec![up(SERVER_A, 9_000)]), 0);
        }
        for _ in 0..20 {
            st.ingest(report(vec![up(SERVER_A, 1_000)]), 0);
        }
        // 60 columns: 2 borders + 28 label + 1 gap leaves 29 for the sparkline.
        let (lines, _) = draw(&st, 60, 12);
        let row = lines
            .iter()
            .rposition(|l| l.contains("a.example:5223"))
            .unwrap();
        let bars: String = lines[row]
            .chars()
            .filter(|c| BARS.contains(c) || *c == ' ')
            .collect();
        let bars = bars.trim();
        // 9 high bars, then 20 low ones: the newest 29 samples.
        assert!(lines[row].ends_with("│"), "{}", lines[row]);
        let spark: Vec<char> = lines[row].chars().rev().skip(1).take(29).collect();
        assert!(spark[..20].iter().all(|c| *c != '█'), "{bars}");
        assert!(spark[20..].iter().all(|c| *c == '█'), "{bars}");
    }

    #[test]
    fn empty_daemon_and_errors() {
        let mut st = TopState::new(Duration::from_secs(1));
        let (lines, _) = draw(&st, 120, 10);
        assert!(lines[0].contains("waiting for the daemon"));
        st.ingest(report(vec![]), 0);
        st.set_error("busy".into());
        let (lines, _) = draw(&st, 120, 10);
        assert!(line_with(&lines, "no upstream connections").contains('│'));
        assert!(lines[9].contains("refresh failed: busy"), "{}", lines[9]);
        // A good refresh clears the error.
        st.ingest(report(vec![]), 0);
        let (lines, _) = draw(&st, 120, 10);
        assert!(!lines[9].contains("refresh failed"));
    }

    #[test]
    fn keys() {
        let key = |code, modifiers| TermEvent::Key(KeyEvent::new(code, modifiers));
        assert_eq!(
            action(&key(KeyCode::Char('q'), KeyModifiers::NONE)),
            Action::Quit
        );
        assert_eq!(action(&key(KeyCode::Esc, KeyModifiers::NONE)), Action::Quit);
        assert_eq!(
            action(&key(KeyCode::Char('c'), KeyModifiers::CONTROL)),
            Action::Quit
        );
        assert_eq!(
            action(&key(KeyCode::Char('c'), KeyModifiers::NONE)),
            Action::Nothing
        );
        assert_eq!(action(&TermEvent::Resize(80, 24)), Action::Redraw);
    }

    #[test]
    fn long_key_hashes_are_cut_in_the_table() {
        let long = "smp://AbCdEfGhIjKlMnOpQrStUvWxYz0123456789-_abcd=@smp8.simplex.im:5223";
        assert_eq!(table_server(long), "smp://AbCdEfGh…@smp8.simplex.im:5223");
        assert_eq!(table_server(SERVER_A), SERVER_A);
        assert_eq!(table_server("a.example:5223"), "a.example:5223");
        assert_eq!(short_server(long), "smp8.simplex.im:5223");
    }

    #[test]
    fn narrow_terminal_keeps_the_essential_columns() {
        let mut st = TopState::new(Duration::from_secs(1));
        st.ingest(
            report(vec![up(SERVER_A, 1_500), backing_off(SERVER_B)]),
            1_060_000,
        );
        let (lines, _) = draw(&st, 80, 16);
        let text = lines.join("\n");
        let header = line_with(&lines, "SERVER");
        for kept in ["STATE", "LAST ms", "LAST ERROR"] {
            assert!(header.contains(kept), "{kept} missing:\n{text}");
        }
        for dropped in ["PROFILE", "QUEUES", "PENDING"] {
            assert!(!header.contains(dropped), "{dropped} kept:\n{text}");
        }
        let a = line_with(&lines, SERVER_A);
        assert!(a.contains(" up ") && a.contains("1.5"), "{text}");
        let b = line_with(&lines, SERVER_B);
        assert!(
            b.contains("backing_off") && b.contains("connection"),
            "{text}"
        );
    }

    /// A stand-in daemon on a real Unix socket: answers the hello and every `status` with
    /// one server that is up (its RTT rising and falling by request) and one backing off.
    /// With `hang_up_after`, it closes each connection after that many status replies.
    fn fake_daemon(path: &std::path::Path, hang_up_after: Option<u64>) {
        use muxd_ipc_proto::{
            ClientMessage, FrameDecoder, Op, PROTO_VERSION, Reply, Response, ServerHello,
            ServerMessage, encode_frame,
        };
        use std::io::{Read, Write};

        let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                std::thread::spawn(move || {
                    let mut dec = FrameDecoder::new();
                    let mut buf = [0u8; 4096];
                    let mut n_status = 0u64;
                    loop {
                        let msg = loop {
                            if let Some(m) = dec.next::<ClientMessage>().unwrap() {
                                break m;
                            }
                            match conn.read(&mut buf) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => dec.extend(&buf[..n]),
                            }
                        };
                        let reply = match msg {
                            ClientMessage::Hello(_) => ServerMessage::Hello(ServerHello {
                                proto_version: PROTO_VERSION,
                                daemon_version: "9.9.9-fake".into(),
                                pid: 4242,
                            }),
                            ClientMessage::Request(_) if Some(n_status) == hang_up_after => {
                                return;
                            }
                            ClientMessage::Request(r) if r.op == Op::Status => {
                                n_status += 1;
                                // A saw-tooth, so the bars differ in height.
                                let rtt = 1_000 + (n_status % 4) * 2_000;
                                let mut report = report(vec![
                                    up("smp://k@fake.example:5223", rtt),
                                    backing_off(SERVER_B),
                                ]);
                                report.daemon_version = "9.9.9-fake".into();
                                ServerMessage::Response(Response {
                                    id: r.id,
                                    reply: Reply::Status(report),
                                })
                            }
                            other => panic!("unexpected {other:?}"),
                        };
                        let mut out = Vec::new();
                        encode_frame(&reply, &mut out).unwrap();
                        if conn.write_all(&out).is_err() {
                            return;
                        }
                    }
                });
            }
        });
    }

    /// A private tmux server, killed on drop.
    struct Tmux {
        socket: std::path::PathBuf,
    }

    impl Tmux {
        /// Runs `muxctl top -i 0.2` against `sock` in a new 160x30 tmux session.
        fn start(dir: &std::path::Path, sock: &std::path::Path) -> Self {
            // target/debug/deps/muxctl-<hash> -> target/debug/muxctl
            let exe = std::env::current_exe().unwrap();
            let muxctl = exe.parent().unwrap().parent().unwrap().join("muxctl");
            assert!(
                muxctl.exists(),
                "build it first: {} is missing",
                muxctl.display()
            );
            let tmux = Self {
                socket: dir.join("tmux.sock"),
            };
            // The shell line stays on screen after muxctl exits, showing its exit status.
            let script = format!(
                "'{}' --socket '{}' top -i 0.2; echo EXIT=$?; sleep 60",
                muxctl.display(),
                sock.display()
            );
            let out = tmux.cmd(&[
                "new-session",
                "-d",
                "-s",
                "top",
                "-x",
                "160",
                "-y",
                "30",
                "sh",
                "-c",
                &script,
            ]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            tmux
        }

        fn cmd(&self, args: &[&str]) -> std::process::Output {
            std::process::Command::new("tmux")
                .arg("-S")
                .arg(&self.socket)
                .args(args)
                .output()
                .unwrap()
        }

        fn capture(&self) -> String {
            String::from_utf8(self.cmd(&["capture-pane", "-p", "-t", "top"]).stdout).unwrap()
        }

        /// Captures the pane until `ok` accepts it, failing after 10 s.
        fn wait_for(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let screen = self.capture();
                if ok(&screen) {
                    return screen;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "timed out waiting for {what}; the pane shows:\n{screen}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    impl Drop for Tmux {
        fn drop(&mut self) {
            let _ = self.cmd(&["kill-server"]);
        }
    }

    /// The real binary in a real terminal (tmux): the dashboard comes up with the state and a
    /// sparkline, refreshes, and `q` quits cleanly, leaving the alternate screen.
    ///
    /// Ignored by default because it needs tmux and the `muxctl` binary built next to this
    /// test (`cargo test -p muxctl` builds it): `cargo test -p muxctl -- --ignored top_in_tmux`.
    #[test]
    #[ignore = "needs tmux and the muxctl binary"]
    fn top_in_tmux() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("muxd.sock");
        fake_daemon(&sock, None);
        let tmux = Tmux::start(dir.path(), &sock);

        // Four refreshes have seen the whole saw-tooth (3, 5, 7, 1 ms).
        let screen = tmux.wait_for("the dashboard with four samples", |s| {
            s.contains("1.0–7.0 ms")
        });
        assert!(screen.contains("muxd 9.9.9-fake · pid 77"), "{screen}");
        let a = screen
            .lines()
            .find(|l| l.contains("smp://k@fake.example:5223"))
            .unwrap_or_else(|| panic!("{screen}"));
        assert!(a.contains(" up "), "{screen}");
        let b = screen
            .lines()
            .find(|l| l.contains(SERVER_B))
            .unwrap_or_else(|| panic!("{screen}"));
        assert!(b.contains("backing_off"), "{screen}");
        assert!(screen.contains("q quit · refreshed every 0.2s"), "{screen}");
        let bars: std::collections::BTreeSet<char> =
            screen.chars().filter(|c| BARS.contains(c)).collect();
        assert!(
            bars.len() >= 2,
            "a saw-tooth needs bars of several heights:\n{screen}"
        );

        tmux.cmd(&["send-keys", "-t", "top", "q"]);
        let screen = tmux.wait_for("muxctl to exit", |s| s.contains("EXIT="));
        assert!(screen.contains("EXIT=0"), "{screen}");
        // Back on the normal screen: the dashboard is gone.
        assert!(!screen.contains("q quit"), "{screen}");
    }

    /// The daemon hanging up ends the dashboard with an error, printed on the restored
    /// normal screen (not swallowed as a broken pipe).
    #[test]
    #[ignore = "needs tmux and the muxctl binary"]
    fn top_in_tmux_daemon_goes_away() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("muxd.sock");
        fake_daemon(&sock, Some(3));
        let tmux = Tmux::start(dir.path(), &sock);
        let screen = tmux.wait_for("muxctl to exit", |s| s.contains("EXIT="));
        assert!(screen.contains("EXIT=1"), "{screen}");
        assert!(
            screen.contains("muxctl: lost the connection to muxd"),
            "{screen}"
        );
        assert!(!screen.contains("q quit"), "{screen}");
    }
}
