//! A build log as HTML: bytes cut into lines (a line may span chunks), each line numbered with
//! an anchor to itself, terminal colours (SGR: bold, dim, italic, underline, the 16 basic and
//! bright colours, 256-colour indexes below 16) turned into `<span class>`es, every other escape
//! and control character dropped, and the text HTML-escaped. Colours are CSS classes, never
//! inline styles, so the page's Content-Security-Policy can forbid those.
//!
//! A carriage return inside a line keeps what follows it (progress bars redraw their line).
//!
//! Chunks carry the step that wrote them (0 the clone, 1.. the project's steps): the view notes
//! the line each step's output starts on, so the page links a step to its output.

use std::fmt::Write;

/// The longest line kept whole; longer ones are cut into lines of this many bytes (a build
/// printing one endless line must not make one endless DOM node).
const MAX_LINE: usize = 64 * 1024;

/// SGR attributes in force.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Style {
    fg: Option<u8>,
    bg: Option<u8>,
    bold: bool,
    dim: bool,
    italic: bool,
    underline: bool,
}

impl Style {
    fn classes(&self) -> String {
        let mut c = Vec::new();
        if let Some(f) = self.fg {
            c.push(format!("f{f}"));
        }
        if let Some(b) = self.bg {
            c.push(format!("g{b}"));
        }
        for (on, name) in [
            (self.bold, "b"),
            (self.dim, "d"),
            (self.italic, "i"),
            (self.underline, "u"),
        ] {
            if on {
                c.push(name.to_string());
            }
        }
        c.join(" ")
    }

    /// Applies one SGR sequence's parameters (`1;31`, empty = reset).
    fn apply(&mut self, params: &str) {
        let mut it = params.split([';', ':']).map(|p| {
            if p.is_empty() {
                Some(0)
            } else {
                p.parse::<u32>().ok()
            }
        });
        while let Some(p) = it.next() {
            let Some(p) = p else { continue };
            match p {
                0 => *self = Style::default(),
                1 => self.bold = true,
                2 => self.dim = true,
                3 => self.italic = true,
                4 => self.underline = true,
                22 => {
                    self.bold = false;
                    self.dim = false;
                }
                23 => self.italic = false,
                24 => self.underline = false,
                30..=37 => self.fg = Some((p - 30) as u8),
                39 => self.fg = None,
                40..=47 => self.bg = Some((p - 40) as u8),
                49 => self.bg = None,
                90..=97 => self.fg = Some((p - 90 + 8) as u8),
                100..=107 => self.bg = Some((p - 100 + 8) as u8),
                38 | 48 => {
                    // 38;5;n (256 colours: the first 16 are the basic ones) or 38;2;r;g;b.
                    let colour = match it.next().flatten() {
                        Some(5) => it.next().flatten().filter(|n| *n < 16).map(|n| n as u8),
                        Some(2) => {
                            it.next();
                            it.next();
                            it.next();
                            None
                        }
                        _ => None,
                    };
                    if let Some(c) = colour {
                        if p == 38 {
                            self.fg = Some(c);
                        } else {
                            self.bg = Some(c);
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

/// Turns log bytes into numbered HTML lines; keeps the unfinished last line and the colours in
/// force between calls.
#[derive(Debug, Default)]
pub struct LogView {
    /// The number the next line gets (1-based).
    next_line: u64,
    partial: Vec<u8>,
    style: Style,
    /// The step of the last line started.
    step: Option<u32>,
    /// (step, first line) of each step whose output started since the last take.
    step_starts: Vec<(u32, u64)>,
}

impl LogView {
    /// A view whose first line is numbered `first_line` (1 for a whole log).
    pub fn starting_at(first_line: u64) -> Self {
        LogView {
            next_line: first_line.max(1),
            ..Default::default()
        }
    }

    /// The number the next line will get.
    pub fn next_line(&self) -> u64 {
        self.next_line
    }

    /// The steps whose output started since the last call, with their first line (a step seen
    /// again, as in a re-queued build's next attempt, is given again with its new line).
    pub fn take_step_starts(&mut self) -> Vec<(u32, u64)> {
        std::mem::take(&mut self.step_starts)
    }

    fn line_starts(&mut self, step: u32) {
        if self.step != Some(step) {
            self.step = Some(step);
            self.step_starts.push((step, self.next_line));
        }
    }

    /// Appends the HTML of every line `data` (written by `step`) completes to `out`.
    pub fn push(&mut self, step: u32, data: &[u8], out: &mut String) {
        if self.partial.is_empty() && !data.is_empty() {
            self.line_starts(step);
        }
        let mut rest = data;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            self.partial.extend_from_slice(&rest[..i]);
            let line = std::mem::take(&mut self.partial);
            self.line(&line, out);
            rest = &rest[i + 1..];
            if !rest.is_empty() {
                self.line_starts(step);
            }
        }
        self.partial.extend_from_slice(rest);
        while self.partial.len() >= MAX_LINE {
            let tail = self.partial.split_off(MAX_LINE);
            let line = std::mem::replace(&mut self.partial, tail);
            self.line(&line, out);
        }
    }

    /// Appends the unfinished last line, if any (the log ended, or the page shows what there is).
    pub fn flush(&mut self, out: &mut String) {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.line(&line, out);
        }
    }

    fn line(&mut self, raw: &[u8], out: &mut String) {
        let n = self.next_line;
        self.next_line += 1;
        let text = String::from_utf8_lossy(raw);
        let text = text.strip_suffix('\r').unwrap_or(&text);
        // What a terminal would show: the text after the last carriage return.
        let text = text.rsplit('\r').next().unwrap_or("");
        let _ = write!(
            out,
            "<div class=\"line\" id=\"L{n}\"><a class=\"ln\" href=\"#L{n}\">{n}</a><span class=\"lt\">"
        );
        let mut open = self.open_span(out);
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\u{1b}' => {
                    if chars.peek() == Some(&'[') {
                        chars.next();
                        // CSI: parameter and intermediate bytes, then a final byte.
                        let mut params = String::new();
                        let mut fin = None;
                        for c in chars.by_ref() {
                            if ('\u{40}'..='\u{7e}').contains(&c) {
                                fin = Some(c);
                                break;
                            }
                            if params.len() < 64 {
                                params.push(c);
                            }
                        }
                        if fin == Some('m') {
                            self.style.apply(&params);
                            if open {
                                out.push_str("</span>");
                            }
                            open = self.open_span(out);
                        }
                    } else {
                        // Another escape: drop it and the byte it introduces.
                        chars.next();
                    }
                }
                '&' => out.push_str("&amp;"),
                '<' => out.push_str("&lt;"),
                '>' => out.push_str("&gt;"),
                '"' => out.push_str("&quot;"),
                '\'' => out.push_str("&#39;"),
                '\t' => out.push('\t'),
                c if c.is_control() => {}
                c => out.push(c),
            }
        }
        if open {
            out.push_str("</span>");
        }
        out.push_str("</span></div>");
    }

    /// Opens a span for the style in force, if it is not the plain one.
    fn open_span(&self, out: &mut String) -> bool {
        if self.style == Style::default() {
            return false;
        }
        let _ = write!(out, "<span class=\"{}\">", self.style.classes());
        true
    }
}

/// The whole of `data` as HTML lines from line 1 (tests and short logs).
pub fn render(data: &[u8]) -> String {
    let mut v = LogView::starting_at(1);
    let mut out = String::new();
    v.push(0, data, &mut out);
    v.flush(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_numbered_anchored_and_escaped() {
        let html = render(b"a <script>alert('x')</script> & \"q\"\nsecond");
        assert_eq!(
            html,
            "<div class=\"line\" id=\"L1\"><a class=\"ln\" href=\"#L1\">1</a><span class=\"lt\">\
             a &lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;</span></div>\
             <div class=\"line\" id=\"L2\"><a class=\"ln\" href=\"#L2\">2</a><span class=\"lt\">\
             second</span></div>"
        );
    }

    #[test]
    fn colours_become_classes_and_carry_across_lines() {
        let html = render(b"\x1b[1;31merror\x1b[0m ok\n\x1b[32mgreen\ncont\x1b[m\n");
        assert!(
            html.contains("<span class=\"f1 b\">error</span> ok"),
            "{html}"
        );
        assert!(html.contains("<span class=\"f2\">green</span>"), "{html}");
        // Still green on the next line until reset.
        assert!(html.contains("<span class=\"f2\">cont</span>"), "{html}");
        let html = render(b"\x1b[38;5;9mx\x1b[48;2;1;2;3my\x1b[97;104mz");
        assert!(html.contains("<span class=\"f9\">x"), "{html}");
        assert!(html.contains("<span class=\"f15 g12\">z"), "{html}");
    }

    #[test]
    fn other_escapes_and_controls_are_dropped() {
        let html = render(b"a\x1b[2Kb\x1b]0;title\x07c\x00d\x08\n");
        // The OSC's text stays (only ESC and its next byte go), the controls go.
        assert!(html.contains("ab0;titlecd</span>"), "{html}");
        assert!(!html.contains('\u{1b}'));
    }

    #[test]
    fn carriage_returns_keep_the_last_redraw_and_crlf_ends_a_line() {
        let html = render(b"10%\r50%\r100%\nwin\r\n");
        assert!(html.contains(">100%</span>"), "{html}");
        assert!(html.contains(">win</span>"), "{html}");
        assert!(!html.contains("50%"));
    }

    #[test]
    fn a_line_may_span_chunks_and_a_long_line_is_cut() {
        let mut v = LogView::starting_at(7);
        let mut out = String::new();
        v.push(1, b"hel", &mut out);
        assert!(out.is_empty());
        v.push(1, b"lo\nwor", &mut out);
        assert!(
            out.contains("id=\"L7\"") && out.contains(">hello<"),
            "{out}"
        );
        v.flush(&mut out);
        assert!(out.contains("id=\"L8\"") && out.contains(">wor<"), "{out}");
        assert_eq!(v.next_line(), 9);
        let long = vec![b'x'; MAX_LINE * 2 + 5];
        let mut out = String::new();
        let mut v = LogView::starting_at(1);
        v.push(0, &long, &mut out);
        v.flush(&mut out);
        assert_eq!(out.matches("class=\"line\"").count(), 3);
    }

    #[test]
    fn each_step_notes_the_line_its_output_starts_on() {
        let mut v = LogView::starting_at(1);
        let mut out = String::new();
        v.push(0, b"hive: cloning\nchecked out\n", &mut out);
        v.push(1, b"$ make\ncc -c", &mut out);
        v.push(1, b" x.c\n", &mut out);
        assert_eq!(v.take_step_starts(), vec![(0, 1), (1, 3)]);
        v.push(2, b"$ make test\n", &mut out);
        // A new attempt starts over at the clone.
        v.push(0, b"hive: cloning\n", &mut out);
        assert_eq!(v.take_step_starts(), vec![(2, 5), (0, 6)]);
        assert!(v.take_step_starts().is_empty());
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        let html = render(b"ok \xff\xfe end");
        assert!(html.contains("ok \u{fffd}\u{fffd} end"), "{html}");
    }
}
