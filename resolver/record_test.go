package resolver

import (
	"errors"
	"strings"
	"testing"
)

// parseRecordTests covers RFC 8461 §3.1 and SPEC 3.2, 3.3. wantID "" means
// the record is invalid. candidate is IsCandidate's answer (SPEC 3.2).
var parseRecordTests = []struct {
	name      string
	txt       string
	candidate bool
	wantID    string
}{
	// Valid records.
	{"minimal", "v=STSv1; id=20160831085700Z;", true, "20160831085700Z"},
	{"no trailing semicolon", "v=STSv1; id=20160831085700Z", true, "20160831085700Z"},
	{"no WSP at all", "v=STSv1;id=abc;", true, "abc"},
	{"WSP before semicolon", "v=STSv1 ; id=abc ;", true, "abc"},
	{"tabs and spaces", "v=STSv1;\t id=abc \t; \t", true, "abc"},
	{"many spaces", "v=STSv1;     id=abc     ;     ", true, "abc"},
	{"trailing WSP without semicolon accepted", "v=STSv1; id=abc  ", true, "abc"},
	{"single-char id", "v=STSv1; id=a", true, "a"},
	{"digits-only id", "v=STSv1; id=0", true, "0"},
	{"id of 32 chars", "v=STSv1; id=" + strings.Repeat("a", 32), true, strings.Repeat("a", 32)},
	{"id keeps its case", "v=STSv1; id=AbC", true, "AbC"},
	{"extension ignored", "v=STSv1; id=abc; ext=value", true, "abc"},
	{"extension before id", "v=STSv1; ext=value; id=abc", true, "abc"},
	{"extension with all value chars", "v=STSv1; id=abc; x=!\"#$%&'()*+,-./0123456789:<>?@AZ[\\]^_`az{|}~", true, "abc"},
	{"extension name of 32 chars", "v=STSv1; id=abc; " + "a" + strings.Repeat("b", 31) + "=1", true, "abc"},
	{"extension name with _-.", "v=STSv1; id=abc; 9a_b-c.d=1", true, "abc"},
	{"uppercase ID is an extension", "v=STSv1; ID=zzz; id=abc", true, "abc"},
	{"repeated id keeps first", "v=STSv1; id=first; id=second", true, "first"},
	{"repeated id with bad syntax after a valid one", "v=STSv1; id=first; id=bad-id", true, "first"},
	{"repeated extension", "v=STSv1; ext=1; ext=2; id=abc", true, "abc"},

	// Not candidates (SPEC 3.2): never parsed by SelectRecord.
	{"STSv10", "v=STSv10; id=abc", false, ""},
	{"STSv2", "v=STSv2; id=abc", false, ""},
	{"lowercase version", "v=stsv1; id=abc", false, ""},
	{"leading space", " v=STSv1; id=abc", false, ""},
	{"empty", "", false, ""},
	{"SPF", "v=spf1 -all", false, ""},
	{"version without separator", "v=STSv1 id=abc", false, ""},
	{"version then comma", "v=STSv1,id=abc", false, ""},

	// Candidates but invalid.
	{"version alone", "v=STSv1", true, ""},
	{"version and semicolon", "v=STSv1;", true, ""},
	{"version and WSP", "v=STSv1 \t", true, ""},
	{"no id", "v=STSv1; ext=1", true, ""},
	{"empty id", "v=STSv1; id=", true, ""},
	{"empty id then semicolon", "v=STSv1; id=;", true, ""},
	{"id of 33 chars", "v=STSv1; id=" + strings.Repeat("a", 33), true, ""},
	{"id with dash", "v=STSv1; id=2016-08-31", true, ""},
	{"id with dot", "v=STSv1; id=1.2", true, ""},
	{"id with underscore", "v=STSv1; id=a_b", true, ""},
	{"id with non-ASCII", "v=STSv1; id=caf\u00e9", true, ""},
	{"first id invalid, second valid", "v=STSv1; id=a-b; id=abc", true, ""},
	{"space before =", "v=STSv1; id =abc", true, ""},
	{"space after =", "v=STSv1; id= abc", true, ""},
	{"spaces around =", "v=STSv1; id = abc", true, ""},
	{"space inside id", "v=STSv1; id=ab c", true, ""},
	{"empty field between semicolons", "v=STSv1;; id=abc", true, ""},
	{"empty field with WSP between semicolons", "v=STSv1; ; id=abc", true, ""},
	{"two trailing semicolons", "v=STSv1; id=abc;;", true, ""},
	{"field without =", "v=STSv1; id=abc; ext", true, ""},
	{"field with ==", "v=STSv1; id=abc; ext==1", true, ""},
	{"value with =", "v=STSv1; id=abc; ext=a=b", true, ""},
	{"empty extension value", "v=STSv1; id=abc; ext=", true, ""},
	{"extension name starting with _", "v=STSv1; id=abc; _ext=1", true, ""},
	{"extension name starting with -", "v=STSv1; id=abc; -ext=1", true, ""},
	{"extension name of 33 chars", "v=STSv1; id=abc; " + strings.Repeat("a", 33) + "=1", true, ""},
	{"extension name with %", "v=STSv1; id=abc; e%t=1", true, ""},
	{"control char in value", "v=STSv1; id=abc; ext=a\x01b", true, ""},
	{"DEL in value", "v=STSv1; id=abc; ext=a\x7fb", true, ""},
	{"NUL after id", "v=STSv1; id=abc\x00", true, ""},
	{"CRLF after id", "v=STSv1; id=abc\r\n", true, ""},
	{"missing semicolon between fields", "v=STSv1; id=abc ext=1", true, ""},
	{"comma separator", "v=STSv1; id=abc, ext=1", true, ""},
}

func TestParseRecord(t *testing.T) {
	for _, tt := range parseRecordTests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseRecord(tt.txt)
			if tt.wantID == "" {
				if err == nil {
					t.Fatalf("ParseRecord(%q) = %+v, want an error", tt.txt, got)
				}
				if !errors.Is(err, ErrInvalidRecord) {
					t.Fatalf("ParseRecord(%q) error = %v, want it to wrap ErrInvalidRecord", tt.txt, err)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseRecord(%q) error = %v, want ID %q", tt.txt, err, tt.wantID)
			}
			if got.ID != tt.wantID {
				t.Fatalf("ParseRecord(%q).ID = %q, want %q", tt.txt, got.ID, tt.wantID)
			}
		})
	}
}

func TestIsCandidateRecord(t *testing.T) {
	for _, tt := range parseRecordTests {
		t.Run(tt.name, func(t *testing.T) {
			if got := IsCandidate(tt.txt); got != tt.candidate {
				t.Fatalf("IsCandidate(%q) = %v, want %v", tt.txt, got, tt.candidate)
			}
		})
	}
}

func TestSelectRecord(t *testing.T) {
	const (
		valid1 = "v=STSv1; id=one;"
		valid2 = "v=STSv1; id=two;"
		spf    = "v=spf1 include:_spf.example.com -all"
	)
	tests := []struct {
		name    string
		txts    []string
		wantID  string
		wantErr error
	}{
		{"no TXT", nil, "", ErrNoRecord},
		{"only non-candidates", []string{spf, "v=STSv10; id=x", "hello"}, "", ErrNoRecord},
		{"one valid", []string{valid1}, "one", nil},
		{"one valid and an SPF record", []string{spf, valid1}, "one", nil},
		{"one valid and a STSv10 record", []string{"v=STSv10; id=x", valid1}, "one", nil},
		{"one invalid candidate", []string{"v=STSv1; id=a-b"}, "", ErrInvalidRecord},
		{"one candidate without id", []string{"v=STSv1"}, "", ErrInvalidRecord},
		{"two valid", []string{valid1, valid2}, "", ErrInvalidRecord},
		{"two identical valid", []string{valid1, valid1}, "", ErrInvalidRecord},
		{"one valid and one invalid candidate", []string{valid1, "v=STSv1; id=bad-id"}, "", ErrInvalidRecord},
		{"one valid and an empty candidate", []string{"v=STSv1;", valid1}, "", ErrInvalidRecord},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := SelectRecord(tt.txts)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("SelectRecord(%q) = %+v, %v; want error %v", tt.txts, got, err, tt.wantErr)
				}
				return
			}
			if err != nil || got.ID != tt.wantID {
				t.Fatalf("SelectRecord(%q) = %+v, %v; want ID %q", tt.txts, got, err, tt.wantID)
			}
		})
	}
}

// TestParseRecordErrorBounded checks SPEC 8.3: remote text in an error is
// short and escaped.
func TestParseRecordErrorBounded(t *testing.T) {
	tests := []string{
		"v=STSv1; id=" + strings.Repeat("x", 10000),
		"v=STSv1; id=abc; ext=" + strings.Repeat("\x01", 10000),
		strings.Repeat("\xff", 10000),
	}
	for _, txt := range tests {
		_, err := ParseRecord(txt)
		if err == nil {
			t.Fatalf("ParseRecord(%.20q...) = nil error, want one", txt)
		}
		if got := len(err.Error()); got > 250 {
			t.Errorf("error is %d bytes, want at most 250: %.300s", got, err)
		}
		for _, r := range err.Error() {
			if r < 0x20 || r > 0x7e {
				t.Errorf("error has unescaped character %q: %.300s", r, err)
				break
			}
		}
	}
}

func FuzzParseRecord(f *testing.F) {
	for _, tt := range parseRecordTests {
		f.Add(tt.txt)
	}
	f.Fuzz(func(t *testing.T, txt string) {
		got, err := ParseRecord(txt)
		again, errAgain := ParseRecord(txt)
		if got != again || (err == nil) != (errAgain == nil) {
			t.Fatalf("ParseRecord(%q) not deterministic: %+v, %v then %+v, %v", txt, got, err, again, errAgain)
		}
		if err != nil {
			if !errors.Is(err, ErrInvalidRecord) {
				t.Fatalf("ParseRecord(%q) error %v does not wrap ErrInvalidRecord", txt, err)
			}
			if got != (Record{}) {
				t.Fatalf("ParseRecord(%q) = %+v with an error", txt, got)
			}
			if len(err.Error()) > 250 {
				t.Fatalf("ParseRecord(%q) error is %d bytes", txt, len(err.Error()))
			}
			return
		}
		if !recordIsID(got.ID) {
			t.Fatalf("ParseRecord(%q).ID = %q, want 1 to 32 letters or digits", txt, got.ID)
		}
		if !IsCandidate(txt) {
			t.Fatalf("ParseRecord(%q) valid but IsCandidate is false", txt)
		}
		if !strings.Contains(txt, "id="+got.ID) {
			t.Fatalf("ParseRecord(%q).ID = %q, not in the record", txt, got.ID)
		}
	})
}

func BenchmarkParseRecord(b *testing.B) {
	const txt = "v=STSv1; id=20160831085700Z; ext=value;"
	b.ReportAllocs()
	for b.Loop() {
		if _, err := ParseRecord(txt); err != nil {
			b.Fatal(err)
		}
	}
}
