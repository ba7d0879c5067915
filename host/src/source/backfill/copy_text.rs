//! Rows of `COPY ... TO STDOUT` in the text format, as [`Value`]s sliced from the data.
//!
//! The backfill reads each chunk with `COPY (SELECT ...) TO STDOUT` rather than a query, for two
//! reasons: the text format prints every value with its type's output function, which is the
//! exact text `pgoutput` sends for the same value (a query's `::text` cast is not: `true::text`
//! is `true` where the output function prints `t`), and a value without escapes is handed on as
//! a slice of the received data, without a copy.
//!
//! The format: one row per line, columns separated by tabs, `\N` for NULL, and backslash
//! escapes for backslash, the control characters and octal or hex bytes.

use bytes::{BufMut, Bytes, BytesMut};

use crate::event::Value;

/// The data was not valid COPY text output.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CopyTextError {
    /// A row had another number of columns than selected.
    #[error("COPY row {row} has {found} columns, expected {expected}")]
    ColumnCount {
        /// 0-based row number within the chunk.
        row: usize,
        /// Columns found.
        found: usize,
        /// Columns selected.
        expected: usize,
    },
    /// A value was not UTF-8.
    #[error("COPY row {row}, column {column} is not valid UTF-8")]
    NotUtf8 {
        /// 0-based row number.
        row: usize,
        /// 0-based column number.
        column: usize,
    },
}

/// Collects the rows of one COPY, fed in the pieces the server sent.
pub struct CopyRows {
    columns: usize,
    /// Bytes of an unfinished line carried over to the next piece.
    partial: BytesMut,
    rows: Vec<Vec<Value>>,
}

impl CopyRows {
    /// A reader of rows of `columns` columns.
    pub fn new(columns: usize) -> CopyRows {
        CopyRows {
            columns,
            partial: BytesMut::new(),
            rows: Vec::new(),
        }
    }

    /// Takes the next piece of COPY data (the server sends one row per piece, but any cut is
    /// accepted).
    pub fn push(&mut self, piece: Bytes) -> Result<(), CopyTextError> {
        let data = if self.partial.is_empty() {
            piece
        } else {
            self.partial.extend_from_slice(&piece);
            self.partial.split().freeze()
        };
        let complete = match data.iter().rposition(|&byte| byte == b'\n') {
            Some(last_newline) => last_newline + 1,
            None => 0,
        };
        self.partial.extend_from_slice(&data[complete..]);
        let mut start = 0;
        while start < complete {
            let end = start
                + data[start..complete]
                    .iter()
                    .position(|&b| b == b'\n')
                    .unwrap_or(complete - start);
            let row = self.row(data.slice(start..end))?;
            self.rows.push(row);
            start = end + 1;
        }
        Ok(())
    }

    /// The rows read, once the COPY ended. A last line without its newline is a row too.
    pub fn finish(mut self) -> Result<Vec<Vec<Value>>, CopyTextError> {
        if !self.partial.is_empty() {
            let line = self.partial.split().freeze();
            let row = self.row(line)?;
            self.rows.push(row);
        }
        Ok(self.rows)
    }

    fn row(&self, line: Bytes) -> Result<Vec<Value>, CopyTextError> {
        let row_number = self.rows.len();
        let mut values = Vec::with_capacity(self.columns);
        let mut start = 0;
        loop {
            let end = line[start..]
                .iter()
                .position(|&byte| byte == b'\t')
                .map_or(line.len(), |at| start + at);
            let field = line.slice(start..end);
            let column = values.len();
            values.push(field_value(field).map_err(|()| CopyTextError::NotUtf8 {
                row: row_number,
                column,
            })?);
            if end == line.len() {
                break;
            }
            start = end + 1;
        }
        if values.len() != self.columns {
            return Err(CopyTextError::ColumnCount {
                row: row_number,
                found: values.len(),
                expected: self.columns,
            });
        }
        Ok(values)
    }
}

fn field_value(field: Bytes) -> Result<Value, ()> {
    if field.as_ref() == b"\\N" {
        return Ok(Value::Null);
    }
    let text = if field.contains(&b'\\') {
        unescape(&field)
    } else {
        field
    };
    Value::text(text).map_err(|_| ())
}

/// Undoes COPY's backslash escapes.
fn unescape(field: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(field.len());
    let mut bytes = field.iter().copied().peekable();
    while let Some(byte) = bytes.next() {
        if byte != b'\\' {
            out.put_u8(byte);
            continue;
        }
        let Some(escaped) = bytes.next() else {
            out.put_u8(b'\\');
            break;
        };
        match escaped {
            b'b' => out.put_u8(0x08),
            b'f' => out.put_u8(0x0c),
            b'n' => out.put_u8(b'\n'),
            b'r' => out.put_u8(b'\r'),
            b't' => out.put_u8(b'\t'),
            b'v' => out.put_u8(0x0b),
            b'0'..=b'7' => {
                let mut value = u32::from(escaped - b'0');
                for _ in 0..2 {
                    match bytes.peek() {
                        Some(&digit @ b'0'..=b'7') => {
                            value = value * 8 + u32::from(digit - b'0');
                            bytes.next();
                        }
                        _ => break,
                    }
                }
                out.put_u8(value as u8);
            }
            b'x' => {
                let mut value = 0u32;
                let mut digits = 0;
                while digits < 2 {
                    match bytes.peek().and_then(|&digit| (digit as char).to_digit(16)) {
                        Some(digit) => {
                            value = value * 16 + digit;
                            bytes.next();
                            digits += 1;
                        }
                        None => break,
                    }
                }
                if digits == 0 {
                    out.put_u8(b'x');
                } else {
                    out.put_u8(value as u8);
                }
            }
            other => out.put_u8(other),
        }
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(value: &Value) -> Option<&str> {
        value.as_str()
    }

    #[test]
    fn plain_values_nulls_and_escapes() {
        let mut rows = CopyRows::new(3);
        rows.push(Bytes::from_static(b"1\thello\t\\N\n")).unwrap();
        rows.push(Bytes::from_static(b"2\ta\\tb\\nc\\\\d\\101\\x42\t\n"))
            .unwrap();
        let rows = rows.finish().unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(text(&rows[0][0]), Some("1"));
        assert_eq!(text(&rows[0][1]), Some("hello"));
        assert_eq!(rows[0][2], Value::Null);
        assert_eq!(text(&rows[1][1]), Some("a\tb\nc\\dAB"));
        // An empty string is a value, not NULL.
        assert_eq!(text(&rows[1][2]), Some(""));
    }

    #[test]
    fn rows_cut_anywhere_are_joined() {
        let data = b"10\tfirst row\n20\tsecond\\trow\n30\tthird";
        for cut in 1..data.len() {
            let mut rows = CopyRows::new(2);
            rows.push(Bytes::copy_from_slice(&data[..cut])).unwrap();
            rows.push(Bytes::copy_from_slice(&data[cut..])).unwrap();
            let rows = rows.finish().unwrap();
            let texts: Vec<Vec<&str>> = rows
                .iter()
                .map(|row| row.iter().map(|value| value.as_str().unwrap()).collect())
                .collect();
            assert_eq!(
                texts,
                [
                    vec!["10", "first row"],
                    vec!["20", "second\trow"],
                    vec!["30", "third"]
                ],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn unescaped_values_are_slices_of_the_data() {
        let data = Bytes::from_static(b"1\tshared\n");
        let mut rows = CopyRows::new(2);
        rows.push(data.clone()).unwrap();
        let rows = rows.finish().unwrap();
        let Value::Text(value) = &rows[0][1] else {
            panic!("not text");
        };
        let range = data.as_ptr() as usize..data.as_ptr() as usize + data.len();
        assert!(range.contains(&(value.as_bytes().as_ptr() as usize)));
    }

    #[test]
    fn wrong_column_count_and_bad_utf8_are_reported() {
        let mut rows = CopyRows::new(2);
        assert_eq!(
            rows.push(Bytes::from_static(b"1\t2\t3\n")),
            Err(CopyTextError::ColumnCount {
                row: 0,
                found: 3,
                expected: 2
            })
        );
        let mut rows = CopyRows::new(1);
        assert_eq!(
            rows.push(Bytes::from_static(b"\\377\n")),
            Err(CopyTextError::NotUtf8 { row: 0, column: 0 })
        );
    }
}
