//! Rebuilding a graph front to back: the helper behind passes that replace nodes by subgraphs.
//!
//! A pass walks the old graph in [`Graph::nodes`] order and, node by node, either copies it
//! ([`Rewriter::copy`]) or emits replacement nodes ([`Rewriter::op`], [`Rewriter::param`]) and
//! records which new value stands for each old result ([`Rewriter::bind`]). The new graph therefore
//! lists every node where its replacement was emitted, so `kiln ir --after PASS` reads front to back
//! with fresh, dense value ids, instead of the replacements trailing the arena as they would after an
//! in-place edit. Nodes that are neither copied nor bound simply do not exist in the new graph.
//!
//! Result types of emitted ops come from shape inference, as in the builder; a failure there is a
//! [`PassError::Precondition`] naming the pass, since it means the old graph did not have the shape
//! the pass assumed.

use kiln_ir::infer::infer;
use kiln_ir::{Graph, NodeId, Op, TensorType, ValueId};

use rustc_hash::FxHashMap as HashMap;

use super::PassError;

/// The new graph under construction and the map from old values to new ones.
pub(super) struct Rewriter<'g> {
    pass: &'static str,
    old: &'g Graph,
    new: Graph,
    map: HashMap<ValueId, ValueId>,
}

impl<'g> Rewriter<'g> {
    pub(super) fn new(pass: &'static str, old: &'g Graph) -> Rewriter<'g> {
        Rewriter { pass, old, new: Graph::new(old.name()), map: HashMap::default() }
    }

    fn fail(&self, message: impl Into<String>) -> PassError {
        PassError::Precondition { pass: self.pass, message: message.into() }
    }

    /// The new value standing for the old value `v`.
    pub(super) fn get(&self, v: ValueId) -> Result<ValueId, PassError> {
        self.map.get(&v).copied().ok_or_else(|| self.fail(format!("{v} is read before it is rewritten")))
    }

    /// The type of a value of the new graph.
    pub(super) fn ty(&self, v: ValueId) -> &TensorType {
        self.new.ty(v)
    }

    /// Records that the new value `new` stands for the old value `old`.
    pub(super) fn bind(&mut self, old: ValueId, new: ValueId) {
        self.map.insert(old, new);
    }

    /// Copies the old node `n` unchanged: same op, scope and result types, operands mapped.
    pub(super) fn copy(&mut self, n: NodeId) -> Result<(), PassError> {
        let inputs = self.old.node(n).inputs.iter().map(|&v| self.get(v)).collect::<Result<Vec<_>, _>>()?;
        self.copy_reading(n, &inputs)
    }

    /// Copies the old node `n` reading `inputs` (new values of its operands' types) instead of its
    /// operands' new values: same op, scope and result types.
    pub(super) fn copy_reading(&mut self, n: NodeId, inputs: &[ValueId]) -> Result<(), PassError> {
        let node = self.old.node(n);
        let types = node.results.iter().map(|&r| self.old.ty(r).clone()).collect();
        let (_, results) = self
            .new
            .add_node(node.op.clone(), inputs, types, node.scope.as_deref())
            .map_err(|e| self.fail(e.to_string()))?;
        for (&old, new) in node.results.iter().zip(results) {
            self.map.insert(old, new);
        }
        Ok(())
    }

    /// Emits `op` on new values; its result types come from shape inference.
    pub(super) fn op(
        &mut self,
        op: Op,
        inputs: &[ValueId],
        scope: Option<&str>,
    ) -> Result<Vec<ValueId>, PassError> {
        let tys: Vec<&TensorType> = inputs.iter().map(|&v| self.new.ty(v)).collect();
        let types = infer(&op, &tys).map_err(|e| self.fail(e.to_string()))?;
        let (_, results) =
            self.new.add_node(op, inputs, types, scope).map_err(|e| self.fail(e.to_string()))?;
        Ok(results)
    }

    /// Emits an op with exactly one result.
    pub(super) fn op1(
        &mut self,
        op: Op,
        inputs: &[ValueId],
        scope: Option<&str>,
    ) -> Result<ValueId, PassError> {
        Ok(self.op(op, inputs, scope)?[0])
    }

    /// Emits a parameter of the given type.
    pub(super) fn param(
        &mut self,
        name: String,
        ty: TensorType,
        scope: Option<&str>,
    ) -> Result<ValueId, PassError> {
        let (_, results) = self
            .new
            .add_node(Op::Param { name }, &[], vec![ty], scope)
            .map_err(|e| self.fail(e.to_string()))?;
        Ok(results[0])
    }

    /// The new graph, with the old graph's outputs mapped.
    pub(super) fn finish(mut self) -> Result<Graph, PassError> {
        for (name, v) in self.old.outputs() {
            let nv = self.get(*v)?;
            self.new.add_output(name.clone(), nv).map_err(|e| self.fail(e.to_string()))?;
        }
        Ok(self.new)
    }
}

/// Which named rewrite rules of a pass fired, and how often, in the order of the pass's rule table.
/// Its `Display` is the trace line (`experts-to-grouped x3, flatten-tokens x3`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trace {
    fired: Vec<(&'static str, usize)>,
}

impl Trace {
    /// A trace of the given rules, none fired yet.
    pub fn new(rules: &[&'static str]) -> Trace {
        Trace { fired: rules.iter().map(|&r| (r, 0)).collect() }
    }

    /// Counts one application of `rule`, which must be in the table the trace was made from.
    pub(super) fn fire(&mut self, rule: &'static str) {
        match self.fired.iter_mut().find(|(r, _)| *r == rule) {
            Some((_, n)) => *n += 1,
            None => debug_assert!(false, "rule `{rule}` is not in the pass's table"),
        }
    }

    /// How often `rule` fired.
    pub fn count(&self, rule: &str) -> usize {
        self.fired.iter().find(|(r, _)| *r == rule).map_or(0, |&(_, n)| n)
    }

    /// Whether any rule fired, i.e. whether the graph changed.
    pub fn changed(&self) -> super::Changed {
        if self.fired.iter().any(|&(_, n)| n > 0) {
            super::Changed::Yes
        } else {
            super::Changed::No
        }
    }
}

impl std::fmt::Display for Trace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let fired: Vec<String> =
            self.fired.iter().filter(|&&(_, n)| n > 0).map(|(r, n)| format!("{r} x{n}")).collect();
        if fired.is_empty() {
            f.write_str("no rule fired")
        } else {
            f.write_str(&fired.join(", "))
        }
    }
}
