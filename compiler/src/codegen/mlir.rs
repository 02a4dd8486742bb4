//! A small writer for textual MLIR: one function body at a time, with SSA names handed out by the
//! writer, constants hoisted to the function's entry, and structured control flow (`scf.for`,
//! `scf.if`) written through closures so that regions always close.
//!
//! Why text: the lowering's output is meant to be read (snapshots, `kiln` dumps, bug reports), and
//! MLIR's own parser and verifier check it afterwards. The writer guarantees well-formed *structure*
//! (every value is defined once, before use, in a region that dominates its uses, because constants
//! live in the entry block and loop results are only returned after the loop closes); it does not
//! type-check, which is the verifier's job.
//!
//! Value names are a hint plus a counter (`%x3`, `%acc12`), so the text stays readable and two values
//! never share a name. Integer constants of type `index` are named after their value (`%c64`).

use std::collections::{HashMap, HashSet};
use std::fmt::{self, Write as _};

/// An SSA value in the function being written. Its `Display` is its MLIR name, `%x3`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Value(String);

impl Value {
    /// A value defined outside the writer, such as a function argument (`name` without the `%`).
    pub fn named(name: &str) -> Value {
        Value(format!("%{name}"))
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The body of one function under construction.
#[derive(Debug, Default)]
pub struct Body {
    /// Constants, written at the top of the entry block so that they dominate every use.
    consts: String,
    lines: String,
    /// Indentation (two spaces per level) of the region being written; starts at the function
    /// body's level.
    depth: usize,
    base: usize,
    next: u32,
    const_names: HashMap<(String, String), Value>,
    /// The value of each `index` constant, for folding.
    index_values: HashMap<Value, i64>,
    used_names: HashMap<String, u32>,
    /// Every name handed out, so that a fresh `%a3` never repeats an argument named `a3`.
    taken: HashSet<String>,
}

/// Formats an f64 as an MLIR float literal of an `f32` constant: the shortest decimal that reads
/// back to the same f32, always with a `.`; non-finite values as their bit pattern.
pub fn f32_literal(x: f64) -> String {
    let v = x as f32;
    if !v.is_finite() {
        return format!("0x{:08X}", v.to_bits());
    }
    let s = format!("{v:?}");
    if s.contains('.') {
        s
    } else if let Some((m, e)) = s.split_once('e') {
        format!("{m}.0e{e}")
    } else {
        format!("{s}.0")
    }
}

impl Body {
    /// A body whose lines are indented `indent` levels (two spaces each): 2 for a function inside a
    /// module, 3 for a `gpu.func` inside a `gpu.module`.
    pub fn new(indent: usize) -> Body {
        Body { depth: indent, base: indent, ..Body::default() }
    }

    /// A fresh name `%{hint}{n}`.
    pub fn fresh(&mut self, hint: &str) -> Value {
        loop {
            let name = format!("{hint}{}", self.next);
            self.next += 1;
            if self.taken.insert(name.clone()) {
                return Value(format!("%{name}"));
            }
        }
    }

    /// A name `%{name}` if it is still free, else `%{name}_{n}`: for values whose name carries
    /// meaning (kernel arguments, sizes).
    pub fn named(&mut self, name: &str) -> Value {
        loop {
            let count = self.used_names.entry(name.to_string()).or_insert(0);
            *count += 1;
            let candidate = if *count == 1 { name.to_string() } else { format!("{name}_{}", *count - 1) };
            if self.taken.insert(candidate.clone()) {
                return Value(format!("%{candidate}"));
            }
        }
    }

    /// Writes one line at the current nesting depth.
    pub fn line(&mut self, text: impl fmt::Display) {
        for _ in 0..self.depth {
            self.lines.push_str("  ");
        }
        writeln!(self.lines, "{text}").expect("writing to a String cannot fail");
    }

    /// Writes `%v = {rhs}` and returns `%v`.
    pub fn op(&mut self, hint: &str, rhs: impl fmt::Display) -> Value {
        let v = self.fresh(hint);
        self.line(format_args!("{v} = {rhs}"));
        v
    }

    /// An `arith.constant` of the given literal and type, hoisted to the entry block and shared.
    pub fn constant(&mut self, literal: &str, ty: &str) -> Value {
        let key = (literal.to_string(), ty.to_string());
        if let Some(v) = self.const_names.get(&key) {
            return v.clone();
        }
        let v = if ty == "index" {
            let name = literal.strip_prefix('-').map_or(format!("c{literal}"), |n| format!("cm{n}"));
            self.named(&name)
        } else {
            self.fresh("cst")
        };
        let pad = "  ".repeat(self.base);
        writeln!(self.consts, "{pad}{v} = arith.constant {literal} : {ty}").expect("String write");
        self.const_names.insert(key, v.clone());
        v
    }

    pub fn index(&mut self, n: i64) -> Value {
        let v = self.constant(&n.to_string(), "index");
        self.index_values.insert(v.clone(), n);
        v
    }

    /// Folds `a op b` when both are `index` constants and the result fits.
    fn fold(&mut self, a: &Value, b: &Value, op: fn(u64, u64) -> Option<u64>) -> Option<Value> {
        let (x, y) = (*self.index_values.get(a)?, *self.index_values.get(b)?);
        let r = op(u64::try_from(x).ok()?, u64::try_from(y).ok()?)?;
        Some(self.index(i64::try_from(r).ok()?))
    }

    pub fn f32(&mut self, x: f64) -> Value {
        self.constant(&f32_literal(x), "f32")
    }

    /// `%v = {rhs}` placed in the entry block and shared by `key`: for side-effect-free values that
    /// depend on nothing but the function's arguments (`gpu.thread_id x`).
    pub fn entry_op(&mut self, key: &str, hint: &str, rhs: impl fmt::Display) -> Value {
        let k = (key.to_string(), "entry".to_string());
        if let Some(v) = self.const_names.get(&k) {
            return v.clone();
        }
        let v = self.named(hint);
        let pad = "  ".repeat(self.base);
        writeln!(self.consts, "{pad}{v} = {rhs}").expect("String write");
        self.const_names.insert(k, v.clone());
        v
    }

    /// `arith.addi`, `arith.muli`, ... on `index` values, folding the obvious identities so that the
    /// text carries no `x * 1` or `x + 0`.
    pub fn addi(&mut self, a: &Value, b: &Value) -> Value {
        if let Some(v) = self.fold(a, b, u64::checked_add) {
            return v;
        }
        match (self.is_const(a, "0"), self.is_const(b, "0")) {
            (true, _) => b.clone(),
            (_, true) => a.clone(),
            _ => self.op("i", format_args!("arith.addi {a}, {b} : index")),
        }
    }

    pub fn muli(&mut self, a: &Value, b: &Value) -> Value {
        if let Some(v) = self.fold(a, b, u64::checked_mul) {
            return v;
        }
        if self.is_const(a, "1") {
            return b.clone();
        }
        if self.is_const(b, "1") {
            return a.clone();
        }
        self.op("i", format_args!("arith.muli {a}, {b} : index"))
    }

    pub fn subi(&mut self, a: &Value, b: &Value) -> Value {
        if let Some(v) = self.fold(a, b, u64::checked_sub) {
            return v;
        }
        if self.is_const(b, "0") {
            return a.clone();
        }
        self.op("i", format_args!("arith.subi {a}, {b} : index"))
    }

    pub fn divui(&mut self, a: &Value, b: &Value) -> Value {
        if let Some(v) = self.fold(a, b, u64::checked_div) {
            return v;
        }
        if self.is_const(b, "1") {
            return a.clone();
        }
        self.op("i", format_args!("arith.divui {a}, {b} : index"))
    }

    pub fn remui(&mut self, a: &Value, b: &Value) -> Value {
        if let Some(v) = self.fold(a, b, u64::checked_rem) {
            return v;
        }
        if self.is_const(b, "1") {
            return self.index(0);
        }
        self.op("i", format_args!("arith.remui {a}, {b} : index"))
    }

    pub fn minui(&mut self, a: &Value, b: &Value) -> Value {
        if let Some(v) = self.fold(a, b, |x, y| Some(x.min(y))) {
            return v;
        }
        self.op("i", format_args!("arith.minui {a}, {b} : index"))
    }

    /// The value of an `index` constant made by [`Body::index`] (or folded to one).
    pub fn known(&self, v: &Value) -> Option<i64> {
        self.index_values.get(v).copied()
    }

    fn is_const(&self, v: &Value, literal: &str) -> bool {
        self.index_values.get(v).is_some_and(|n| n.to_string() == literal)
    }

    fn yield_values(&mut self, values: &[Value], types: &str) {
        let vs = values.iter().map(Value::to_string).collect::<Vec<_>>().join(", ");
        self.line(format_args!("scf.yield {vs} : {types}"));
    }

    /// The finished body: constants first, then the code, each line indented for a function body.
    pub fn finish(self) -> String {
        self.finish_with("")
    }

    /// The body with `prologue` (lines already indented for the entry block) between the
    /// constants and the rest: where a function's argument views go, which may use constants.
    pub fn finish_with(self, prologue: &str) -> String {
        let mut out = self.consts;
        out.push_str(prologue);
        out.push_str(&self.lines);
        out
    }

    /// The indentation of the entry block's lines.
    pub fn entry_pad(&self) -> String {
        "  ".repeat(self.base)
    }

    /// Every `%name` the body's text mentions (constants and lines), without the `%`.
    pub fn mentioned(&self) -> HashSet<&str> {
        let mut out = HashSet::new();
        for text in [&self.consts, &self.lines] {
            let bytes = text.as_bytes();
            let mut i = 0;
            while i < bytes.len() {
                if bytes[i] == b'%' {
                    let start = i + 1;
                    let mut j = start;
                    while j < bytes.len() && (bytes[j].is_ascii_alphanumeric() || bytes[j] == b'_') {
                        j += 1;
                    }
                    out.insert(&text[start..j]);
                    i = j;
                } else {
                    i += 1;
                }
            }
        }
        out
    }
}

impl AsMut<Body> for Body {
    fn as_mut(&mut self) -> &mut Body {
        self
    }
}

// Structured control flow. These are free functions over anything that holds a `Body`, so that a
// lowering can keep using its own context (which owns the body) inside the region it is writing.

/// `scf.for %iv = lo to hi step step { body }`.
pub fn for_loop<C: AsMut<Body>>(
    cx: &mut C,
    lo: &Value,
    hi: &Value,
    step: &Value,
    body: impl FnOnce(&mut C, &Value),
) {
    let b = cx.as_mut();
    let iv = b.fresh("iv");
    b.line(format_args!("scf.for {iv} = {lo} to {hi} step {step} {{"));
    b.depth += 1;
    body(cx, &iv);
    let b = cx.as_mut();
    b.depth -= 1;
    b.line("}");
}

/// `scf.for` carrying values: `inits` are `(initial value, type)`; `body` gets the induction
/// variable and the carried values and returns the next ones. Returns the final values.
pub fn for_carry<C: AsMut<Body>>(
    cx: &mut C,
    lo: &Value,
    hi: &Value,
    step: &Value,
    inits: &[(Value, &str)],
    body: impl FnOnce(&mut C, &Value, &[Value]) -> Vec<Value>,
) -> Vec<Value> {
    let b = cx.as_mut();
    let iv = b.fresh("iv");
    let carried: Vec<Value> = inits.iter().map(|_| b.fresh("acc")).collect();
    let results: Vec<Value> = inits.iter().map(|_| b.fresh("red")).collect();
    let iter_args = carried
        .iter()
        .zip(inits)
        .map(|(c, (init, _))| format!("{c} = {init}"))
        .collect::<Vec<_>>()
        .join(", ");
    let types = inits.iter().map(|(_, t)| *t).collect::<Vec<_>>().join(", ");
    b.line(format_args!(
        "{} = scf.for {iv} = {lo} to {hi} step {step} iter_args({iter_args}) -> ({types}) {{",
        results_lhs(&results)
    ));
    b.depth += 1;
    let next = body(cx, &iv, &carried);
    assert_eq!(next.len(), inits.len(), "a loop body yields one value per carried value");
    let b = cx.as_mut();
    b.yield_values(&next, &types);
    b.depth -= 1;
    b.line("}");
    results
}

/// `scf.if cond { body }` without results.
pub fn if_then<C: AsMut<Body>>(cx: &mut C, cond: &Value, body: impl FnOnce(&mut C)) {
    let b = cx.as_mut();
    b.line(format_args!("scf.if {cond} {{"));
    b.depth += 1;
    body(cx);
    let b = cx.as_mut();
    b.depth -= 1;
    b.line("}");
}

/// `scf.if cond { then } else { other }` without results.
pub fn if_then_else<C: AsMut<Body>>(
    cx: &mut C,
    cond: &Value,
    then: impl FnOnce(&mut C),
    other: impl FnOnce(&mut C),
) {
    let b = cx.as_mut();
    b.line(format_args!("scf.if {cond} {{"));
    b.depth += 1;
    then(cx);
    let b = cx.as_mut();
    b.depth -= 1;
    b.line("} else {");
    b.depth += 1;
    other(cx);
    let b = cx.as_mut();
    b.depth -= 1;
    b.line("}");
}

/// `scf.if cond -> (ty) { then } else { other }`, each branch returning its value.
pub fn if_else<C: AsMut<Body>>(
    cx: &mut C,
    cond: &Value,
    ty: &str,
    then: impl FnOnce(&mut C) -> Value,
    other: impl FnOnce(&mut C) -> Value,
) -> Value {
    let b = cx.as_mut();
    let v = b.fresh("sel");
    b.line(format_args!("{v} = scf.if {cond} -> ({ty}) {{"));
    b.depth += 1;
    let a = then(cx);
    let b = cx.as_mut();
    b.yield_values(&[a], ty);
    b.depth -= 1;
    b.line("} else {");
    b.depth += 1;
    let o = other(cx);
    let b = cx.as_mut();
    b.yield_values(&[o], ty);
    b.depth -= 1;
    b.line("}");
    v
}

/// `scf.index_switch sel -> (types) case 0 {..} ... case n-1 {..} default {..}`: `body(cx, Some(i))`
/// writes case `i` and returns the values it yields, `body(cx, None)` the default's. Returns the
/// switch's results. A switch over buffers (one per expert) picks one at run time.
pub fn index_switch<C: AsMut<Body>>(
    cx: &mut C,
    sel: &Value,
    cases: usize,
    types: &[&str],
    mut body: impl FnMut(&mut C, Option<usize>) -> Vec<Value>,
) -> Vec<Value> {
    let b = cx.as_mut();
    let results: Vec<Value> = types.iter().map(|_| b.fresh("sw")).collect();
    let types = types.join(", ");
    b.line(format_args!("{} = scf.index_switch {sel} -> {types}", results_lhs(&results)));
    for case in (0..cases).map(Some).chain([None]) {
        let b = cx.as_mut();
        match case {
            Some(i) => b.line(format_args!("case {i} {{")),
            None => b.line("default {"),
        }
        b.depth += 1;
        let values = body(cx, case);
        let b = cx.as_mut();
        b.yield_values(&values, &types);
        b.depth -= 1;
        b.line("}");
    }
    results
}

/// [`index_switch`] as a tree of switches of at most [`SWITCH_FAN`] cases each: over `sel / size`,
/// then (recursively) `sel % size`, with the same cases and default. A flat switch over 256 buffers
/// (DeepSeek-V3's experts) yields its values through one merge of 257 predecessors, which LLVM's
/// optimiser takes super-linear time over; a tree takes a fraction of it and branches the same way.
pub fn index_switch_tree<C: AsMut<Body>>(
    cx: &mut C,
    sel: &Value,
    cases: usize,
    types: &[&str],
    mut body: impl FnMut(&mut C, Option<usize>) -> Vec<Value>,
) -> Vec<Value> {
    tree(cx, sel, 0, cases, types, &mut body)
}

/// Cases `first .. first + cases` of [`index_switch_tree`], selected by `sel` (relative to `first`).
fn tree<C: AsMut<Body>>(
    cx: &mut C,
    sel: &Value,
    first: usize,
    cases: usize,
    types: &[&str],
    body: &mut dyn FnMut(&mut C, Option<usize>) -> Vec<Value>,
) -> Vec<Value> {
    if cases <= SWITCH_FAN {
        return index_switch(cx, sel, cases, types, |cx, c| body(cx, c.map(|c| first + c)));
    }
    let size = cases.div_ceil(SWITCH_FAN);
    let size_v = cx.as_mut().index(size as i64);
    let (group, within) = (cx.as_mut().divui(sel, &size_v), cx.as_mut().remui(sel, &size_v));
    index_switch(cx, &group, cases.div_ceil(size), types, |cx, g| match g {
        Some(g) => {
            let count = size.min(cases - g * size);
            tree(cx, &within, first + g * size, count, types, body)
        }
        None => body(cx, None),
    })
}

/// The most cases of one switch of [`index_switch_tree`].
pub const SWITCH_FAN: usize = 16;

fn results_lhs(results: &[Value]) -> String {
    results.iter().map(Value::to_string).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_switch_tree_reaches_every_case_once() {
        for cases in [1, 8, 9, 64, 256, 257] {
            let mut b = Body::new(1);
            let sel = b.named("sel");
            let mut seen = Vec::new();
            let _ = index_switch_tree(&mut b, &sel, cases, &["index"], |b, c| {
                seen.push(c);
                vec![b.index(c.map_or(-1, |c| c as i64))]
            });
            let cases_seen: Vec<usize> = seen.iter().flatten().copied().collect();
            assert_eq!(cases_seen, (0..cases).collect::<Vec<_>>(), "{cases}");
            assert!(seen.iter().filter(|c| c.is_none()).count() >= 1);
            // No switch has more than SWITCH_FAN cases.
            let text = b.finish();
            let largest = text
                .lines()
                .filter_map(|l| {
                    l.trim_start().strip_prefix("case ")?.strip_suffix(" {")?.parse::<usize>().ok()
                })
                .max();
            assert_eq!(largest, Some(cases.min(SWITCH_FAN) - 1), "{cases}");
        }
    }

    #[test]
    fn constants_are_hoisted_and_shared() {
        let mut b = Body::new(1);
        let lo = b.index(0);
        let hi = b.index(8);
        let one = b.index(1);
        for_loop(&mut b, &lo, &hi, &one, |b, iv| {
            let two = b.f32(2.0);
            let again = b.f32(2.0);
            assert_eq!(two, again);
            b.line(format_args!("\"test.use\"({iv}, {two}) : (index, f32) -> ()"));
        });
        let text = b.finish();
        assert_eq!(
            text,
            "  %c0 = arith.constant 0 : index\n  %c8 = arith.constant 8 : index\n  \
             %c1 = arith.constant 1 : index\n  %cst1 = arith.constant 2.0 : f32\n  \
             scf.for %iv0 = %c0 to %c8 step %c1 {\n    \"test.use\"(%iv0, %cst1) : (index, f32) -> ()\n  }\n"
        );
    }

    #[test]
    fn identities_fold() {
        let mut b = Body::new(1);
        let x = Value::named("x");
        let zero = b.index(0);
        let one = b.index(1);
        assert_eq!(b.addi(&x, &zero), x);
        assert_eq!(b.muli(&one, &x), x);
        assert_eq!(b.divui(&x, &one), x);
        assert_ne!(b.muli(&x, &x), x);
        let (six, four) = (b.index(6), b.index(4));
        assert_eq!(b.divui(&six, &four), one);
        assert_eq!(b.muli(&six, &four), b.index(24));
        assert_ne!(b.subi(&four, &six), b.index(-2), "no folding to negative unsigned values");
    }

    #[test]
    fn fresh_and_meaningful_names_never_collide() {
        let mut b = Body::new(1);
        let arg = b.named("a3");
        let fresh: Vec<Value> = (0..6).map(|_| b.fresh("a")).collect();
        assert!(!fresh.contains(&arg), "{fresh:?}");
        // The counter is at 7 now: a fresh `%c7`, then an index constant 7 (named `%c7` by value).
        let c = b.fresh("c");
        let seven = b.index(7);
        assert_eq!(c.to_string(), "%c7");
        assert_eq!(seven.to_string(), "%c7_1");
    }

    #[test]
    fn index_switch_yields_from_every_case_and_the_default() {
        let mut b = Body::new(1);
        let sel = Value::named("e");
        let picked = index_switch(&mut b, &sel, 2, &["index"], |b, case| {
            vec![b.index(case.map_or(-1, |c| c as i64 * 10))]
        });
        assert_eq!(picked.len(), 1);
        assert_eq!(
            b.finish(),
            "  %c0 = arith.constant 0 : index\n  %c10 = arith.constant 10 : index\n  \
             %cm1 = arith.constant -1 : index\n  %sw0 = scf.index_switch %e -> index\n  case 0 {\n    \
             scf.yield %c0 : index\n  }\n  case 1 {\n    scf.yield %c10 : index\n  }\n  default {\n    \
             scf.yield %cm1 : index\n  }\n"
        );
    }

    #[test]
    fn float_literals_read_back() {
        assert_eq!(f32_literal(1e-6), "1.0e-6");
        assert_eq!(f32_literal(0.5), "0.5");
        assert_eq!(f32_literal(3.0), "3.0");
        assert_eq!(f32_literal(f64::NEG_INFINITY), "0xFF800000");
        assert_eq!(f32_literal(std::f64::consts::LOG2_E), "1.442695");
    }
}
