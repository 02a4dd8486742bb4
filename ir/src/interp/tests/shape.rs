//! Data movement: embedding, gather, concat, split, reshape and transpose.

use super::*;

#[test]
fn embedding_picks_rows_and_checks_ids() {
    let src = r#"graph @e {
  %0 = input {name = "ids"} : i32[B, T]
  %1 = param {name = "table"} : f32[3, 2]
  %2 = embedding %1, %0 : f32[B, T, 2]
  output "h" = %2
}
"#;
    let table = || vec![("table", f32s(&[3, 2], &[0.0, 1.0, 10.0, 11.0, 20.0, 21.0]))];
    let out = run_kir(src, vec![("ids", i32s(&[1, 3], &[2, 0, 2]))], table()).unwrap();
    assert_eq!(vals(&out["h"]), [20.0, 21.0, 0.0, 1.0, 20.0, 21.0]);
    assert_eq!(out["h"].shape(), [1, 3, 2]);
    let err = run_kir(src, vec![("ids", i32s(&[1, 2], &[1, 3]))], table()).unwrap_err();
    assert_eq!(err.to_string(), "%2 = embedding: token id 3 is out of range 0..3");
    let err = run_kir(src, vec![("ids", i32s(&[1, 1], &[-1]))], table()).unwrap_err();
    assert_eq!(err.to_string(), "%2 = embedding: token id -1 is out of range 0..3");
}

#[test]
fn gather_along_a_middle_axis() {
    let src = r#"graph @g {
  %0 = input {name = "x"} : f32[2, 3, 2]
  %1 = input {name = "i"} : i64[2, 2]
  %2 = gather %0, %1 {axis = 1} : f32[2, 2, 2, 2]
  output "y" = %2
}
"#;
    let x = f32s(&[2, 3, 2], &(0..12).map(|v| v as f32).collect::<Vec<_>>());
    let i = Tensor::from_i64(DType::I64, [2, 2], vec![2, 0, 1, 1]).unwrap();
    let y = eval1(src, vec![("x", x), ("i", i)], "y");
    // y[o, a, b, :] = x[o, i[a, b], :]
    assert_eq!(vals(&y), [4.0, 5.0, 0.0, 1.0, 2.0, 3.0, 2.0, 3.0, 10.0, 11.0, 6.0, 7.0, 8.0, 9.0, 8.0, 9.0]);
}

#[test]
fn concat_split_reshape_transpose() {
    let src = r#"graph @s {
  %0 = input {name = "a"} : f32[2, 1]
  %1 = input {name = "b"} : f32[2, 2]
  %2 = concat %0, %1 {axis = 1} : f32[2, 3]
  %3, %4 = split %2 {axis = 1, sizes = [2, 1]} : f32[2, 2], f32[2, 1]
  %5 = transpose %2 {perm = [1, 0]} : f32[3, 2]
  %6 = reshape %5 {shape = [6]} : f32[6]
  output "cat" = %2
  output "s0" = %3
  output "s1" = %4
  output "t" = %6
}
"#;
    let out = run_kir(
        src,
        vec![("a", f32s(&[2, 1], &[1.0, 4.0])), ("b", f32s(&[2, 2], &[2.0, 3.0, 5.0, 6.0]))],
        vec![],
    )
    .unwrap();
    assert_eq!(vals(&out["cat"]), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert_eq!(vals(&out["s0"]), [1.0, 2.0, 4.0, 5.0]);
    assert_eq!(vals(&out["s1"]), [3.0, 6.0]);
    assert_eq!(vals(&out["t"]), [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    assert_eq!(out["t"].shape(), [6]);
}

#[test]
fn symbolic_reshape_uses_the_bindings() {
    let src = r#"graph @r {
  %0 = input {name = "x"} : i32[B, T]
  %1 = reshape %0 {shape = [B*T]} : i32[B*T]
  %2 = transpose %0 {perm = [1, 0]} : i32[T, B]
  output "flat" = %1
  output "t" = %2
}
"#;
    let out = run_kir(src, vec![("x", i32s(&[2, 3], &[1, 2, 3, 4, 5, 6]))], vec![]).unwrap();
    assert_eq!(out["flat"].as_i64().unwrap(), [1, 2, 3, 4, 5, 6]);
    assert_eq!(out["flat"].shape(), [6]);
    assert_eq!(out["t"].as_i64().unwrap(), [1, 4, 2, 5, 3, 6]);
}

/// `all_to_all` on one process: the block it sends itself, the rows whose flag is zero as zeros
/// (NaN and -0 included: a row that did not travel is zeros, not the operand times zero). Over
/// more processes than the interpreter has, it says so.
#[test]
fn all_to_all_alone_keeps_the_flagged_rows() {
    let src = r#"graph @a {
  %0 = input {name = "x"} : f32[1, 3, 2]
  %1 = input {name = "keep"} : f32[1, 3]
  %2 = all_to_all %0, %1 {group = "ep", size = 1} : f32[1, 3, 2]
  %3 = all_to_all %1 {group = "ep", size = 1} : f32[1, 3]
  output "y" = %2
  output "came" = %3
}
"#;
    let x = f32s(&[1, 3, 2], &[1.0, 2.0, f32::NAN, -0.0, 5.0, 6.0]);
    let keep = f32s(&[1, 3], &[1.0, 0.0, 0.5]);
    let out = run_printed(src, vec![("x", x), ("keep", keep)]);
    assert_eq!(
        vals(&out["y"]).iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        [1.0f32.to_bits(), 2.0f32.to_bits(), 0, 0, 5.0f32.to_bits(), 6.0f32.to_bits()]
    );
    assert_eq!(vals(&out["came"]), [1.0, 0.0, 0.5]);
    let two = src.replace("size = 1", "size = 2").replace("[1, 3", "[2, 3");
    let x = f32s(&[2, 3, 2], &[0.0; 12]);
    let err = run_kir(&two, vec![("x", x), ("keep", f32s(&[2, 3], &[1.0; 6]))], vec![]).unwrap_err();
    assert!(err.to_string().contains("an all_to_all over 2 processes of `ep` needs them"), "{err}");
}
