package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"maps"
	"net/netip"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode"

	"gopkg.in/yaml.v3"
)

// yamlConfig is the shape of the file. Its leaves are yaml.Node so that this
// package reads each value itself, knowing its key path and line: yaml.v3
// would turn 1.5 into 1 for an int and report type errors without the key.
// Decoding into it with KnownFields(true) rejects unknown keys.
type yamlConfig struct {
	Listen    yaml.Node          `yaml:"listen"`
	Socketmap yamlSocketmap      `yaml:"socketmap"`
	DNS       yamlDNS            `yaml:"dns"`
	Fetch     yamlFetch          `yaml:"fetch"`
	Cache     yamlCache          `yaml:"cache"`
	Refresh   yamlRefresh        `yaml:"refresh"`
	Maps      map[string]yamlMap `yaml:"maps"`
	DANE      yaml.Node          `yaml:"dane"`
	Metrics   yamlMetrics        `yaml:"metrics"`
	Admin     yamlAdmin          `yaml:"admin"`
	Log       yamlLog            `yaml:"log"`
}

type yamlAdmin struct {
	Socket yaml.Node `yaml:"socket"`
}

type yamlMetrics struct {
	Listen yaml.Node `yaml:"listen"`
}

type yamlSocketmap struct {
	UnixSocketMode  yaml.Node `yaml:"unix_socket_mode"`
	UnixSocketOwner yaml.Node `yaml:"unix_socket_owner"`
	UnixSocketGroup yaml.Node `yaml:"unix_socket_group"`
	MaxConnections  yaml.Node `yaml:"max_connections"`
	IdleTimeout     yaml.Node `yaml:"idle_timeout"`
	MaxRequestSize  yaml.Node `yaml:"max_request_size"`
}

type yamlDNS struct {
	Nameservers yaml.Node `yaml:"nameservers"`
	Timeout     yaml.Node `yaml:"timeout"`
}

type yamlFetch struct {
	FirstContactTimeout yaml.Node `yaml:"first_contact_timeout"`
	Timeout             yaml.Node `yaml:"timeout"`
}

type yamlCache struct {
	Size        yaml.Node `yaml:"size"`
	NegativeTTL yaml.Node `yaml:"negative_ttl"`
	Store       yaml.Node `yaml:"store"`
	Path        yaml.Node `yaml:"path"`
	RedisURL    yaml.Node `yaml:"redis_url"`
	RedisPrefix yaml.Node `yaml:"redis_prefix"`
}

type yamlRefresh struct {
	Interval    yaml.Node `yaml:"interval"`
	RenewBefore yaml.Node `yaml:"renew_before"`
	Concurrency yaml.Node `yaml:"concurrency"`
	IdleAfter   yaml.Node `yaml:"idle_after"`
}

type yamlMap struct {
	StrictTesting yaml.Node `yaml:"strict_testing"`
	Servername    yaml.Node `yaml:"servername"`
	TLSRPT        yaml.Node `yaml:"tlsrpt"`
}

type yamlLog struct {
	Level  yaml.Node `yaml:"level"`
	Format yaml.Node `yaml:"format"`
}

// decode turns data into a valid Config, or returns every problem found.
func decode(data []byte) (*Config, []*configError) {
	// First pass: the node tree, which knows the line of every key, and the
	// check that the file holds one document.
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var root yaml.Node
	if err := dec.Decode(&root); errors.Is(err, io.EOF) {
		return Default(), nil // empty, or only comments
	} else if err != nil {
		return nil, []*configError{syntaxError(err)}
	}
	var next yaml.Node
	if err := dec.Decode(&next); err == nil {
		return nil, []*configError{{line: next.Line, msg: "a second YAML document starts here; the file must hold one"}}
	} else if !errors.Is(err, io.EOF) {
		return nil, []*configError{syntaxError(err)}
	}
	ks := locate(&root, "", nil)

	// Second pass: the same bytes into yamlConfig, strictly. yaml.Node's
	// own Decode would ignore KnownFields.
	strict := yaml.NewDecoder(bytes.NewReader(data))
	strict.KnownFields(true)
	var y yamlConfig
	var errs []*configError
	if err := strict.Decode(&y); err != nil {
		var te *yaml.TypeError
		if !errors.As(err, &te) {
			return nil, []*configError{syntaxError(err)}
		}
		for _, msg := range te.Errors {
			errs = append(errs, typeError(msg, ks))
		}
	}
	for _, k := range ks {
		// yaml.v3 drops a null map key without a word.
		if k.parent == "maps" && k.key.ShortTag() == "!!null" {
			errs = append(errs, &configError{line: k.key.Line, path: "maps", msg: "a map name must not be null; quote it"})
		}
	}

	c := Default()
	errs = append(errs, y.apply(c)...)
	if len(errs) > 0 {
		return nil, errs
	}
	errs = c.validate()
	for _, e := range errs {
		e.line = ks.line(e.at)
	}
	if len(errs) > 0 {
		return nil, errs
	}
	return c, nil
}

// apply lays the values present in y over c and returns those it could not
// read.
func (y *yamlConfig) apply(c *Config) []*configError {
	var r reader
	r.strings(&c.Listen, &y.Listen, "listen")
	field(&r, &c.Socketmap.UnixSocketMode, &y.Socketmap.UnixSocketMode, "socketmap.unix_socket_mode", readFileMode)
	field(&r, &c.Socketmap.UnixSocketOwner, &y.Socketmap.UnixSocketOwner, "socketmap.unix_socket_owner", readString)
	field(&r, &c.Socketmap.UnixSocketGroup, &y.Socketmap.UnixSocketGroup, "socketmap.unix_socket_group", readString)
	field(&r, &c.Socketmap.MaxConnections, &y.Socketmap.MaxConnections, "socketmap.max_connections", readInt)
	field(&r, &c.Socketmap.IdleTimeout, &y.Socketmap.IdleTimeout, "socketmap.idle_timeout", readDuration)
	field(&r, &c.Socketmap.MaxRequestSize, &y.Socketmap.MaxRequestSize, "socketmap.max_request_size", readInt)
	if r.strings(&c.DNS.Nameservers, &y.DNS.Nameservers, "dns.nameservers") {
		for i, s := range c.DNS.Nameservers {
			c.DNS.Nameservers[i] = withDefaultPort(s)
		}
	}
	field(&r, &c.DNS.Timeout, &y.DNS.Timeout, "dns.timeout", readDuration)
	field(&r, &c.Fetch.FirstContactTimeout, &y.Fetch.FirstContactTimeout, "fetch.first_contact_timeout", readDuration)
	field(&r, &c.Fetch.Timeout, &y.Fetch.Timeout, "fetch.timeout", readDuration)
	field(&r, &c.Cache.Size, &y.Cache.Size, "cache.size", readInt)
	field(&r, &c.Cache.NegativeTTL, &y.Cache.NegativeTTL, "cache.negative_ttl", readDuration)
	field(&r, &c.Cache.Store, &y.Cache.Store, "cache.store", readString)
	field(&r, &c.Cache.Path, &y.Cache.Path, "cache.path", readString)
	field(&r, &c.Cache.RedisURL, &y.Cache.RedisURL, "cache.redis_url", readString)
	field(&r, &c.Cache.RedisPrefix, &y.Cache.RedisPrefix, "cache.redis_prefix", readString)
	field(&r, &c.Refresh.Interval, &y.Refresh.Interval, "refresh.interval", readDuration)
	field(&r, &c.Refresh.RenewBefore, &y.Refresh.RenewBefore, "refresh.renew_before", readDuration)
	field(&r, &c.Refresh.Concurrency, &y.Refresh.Concurrency, "refresh.concurrency", readInt)
	field(&r, &c.Refresh.IdleAfter, &y.Refresh.IdleAfter, "refresh.idle_after", readDuration)
	for _, name := range slices.Sorted(maps.Keys(y.Maps)) {
		ym := y.Maps[name]
		m := c.Maps[name] // "*" starts from the defaults, other names from nothing
		var b bool
		if field(&r, &b, &ym.StrictTesting, "maps."+name+".strict_testing", readBool) {
			m.StrictTesting = new(b)
		}
		if field(&r, &b, &ym.Servername, "maps."+name+".servername", readBool) {
			m.Servername = new(b)
		}
		if field(&r, &b, &ym.TLSRPT, "maps."+name+".tlsrpt", readBool) {
			m.TLSRPT = new(b)
		}
		c.Maps[name] = m
	}
	field(&r, &c.DANE, &y.DANE, "dane", readString)
	field(&r, &c.Metrics.Listen, &y.Metrics.Listen, "metrics.listen", readString)
	field(&r, &c.Admin.Socket, &y.Admin.Socket, "admin.socket", readString)
	field(&r, &c.Log.Level, &y.Log.Level, "log.level", readLevel)
	field(&r, &c.Log.Format, &y.Log.Format, "log.format", readString)
	return r.errs
}

// reader collects the problems met while reading values.
type reader struct {
	errs []*configError
}

func (r *reader) fail(n *yaml.Node, path, msg string) {
	r.errs = append(r.errs, &configError{line: n.Line, path: path, msg: msg})
}

// field sets *dst from n when the key is present and reports whether it did.
func field[T any](r *reader, dst *T, n *yaml.Node, path string, read func(*yaml.Node) (T, error)) bool {
	if n.Kind == 0 {
		return false // key absent: keep the default
	}
	v, err := read(deref(n))
	if err != nil {
		r.fail(n, path, err.Error())
		return false
	}
	*dst = v
	return true
}

// strings sets *dst from the list n when the key is present and reports
// whether it did. A null list is an empty one.
func (r *reader) strings(dst *[]string, n *yaml.Node, path string) bool {
	if n.Kind == 0 {
		return false
	}
	l := deref(n)
	if l.ShortTag() == "!!null" {
		*dst = nil
		return true
	}
	if l.Kind != yaml.SequenceNode {
		r.fail(n, path, `must be a list, e.g. ["a", "b"]`)
		return false
	}
	var list []string
	ok := true
	for i, item := range l.Content {
		s, err := readString(deref(item))
		if err != nil {
			r.fail(item, fmt.Sprintf("%s[%d]", path, i), err.Error())
			ok = false
		}
		list = append(list, s)
	}
	if ok {
		*dst = list
	}
	return ok
}

// deref returns the node an alias stands for.
func deref(n *yaml.Node) *yaml.Node {
	if n.Kind == yaml.AliasNode && n.Alias != nil {
		return n.Alias
	}
	return n
}

func readString(n *yaml.Node) (string, error) {
	switch {
	case n.Kind != yaml.ScalarNode:
		return "", errors.New("must be a single value, not a list or mapping")
	case n.ShortTag() == "!!null":
		return "", errors.New("has no value")
	}
	return n.Value, nil
}

func readInt(n *yaml.Node) (int, error) {
	if _, err := readString(n); err != nil {
		return 0, err
	}
	var v int
	if n.ShortTag() != "!!int" || n.Decode(&v) != nil {
		if strings.Trim(n.Value, "+-0123456789") == "" && !quoted(n) {
			return 0, fmt.Errorf("%s is out of range", n.Value)
		}
		return 0, fmt.Errorf("must be a whole number, not %s", describe(n))
	}
	return v, nil
}

func readBool(n *yaml.Node) (bool, error) {
	if _, err := readString(n); err != nil {
		return false, err
	}
	if n.ShortTag() != "!!bool" {
		return false, fmt.Errorf("must be true or false, not %s", describe(n))
	}
	var v bool
	err := n.Decode(&v)
	return v, err
}

func quoted(n *yaml.Node) bool {
	return n.Style&(yaml.DoubleQuotedStyle|yaml.SingleQuotedStyle) != 0
}

// describe quotes a scalar's text for an error message, saying so when the
// file quotes it: a quoted "1000" is a string, not a number.
func describe(n *yaml.Node) string {
	if quoted(n) {
		return fmt.Sprintf("the string %q", n.Value)
	}
	return strconv.Quote(n.Value)
}

// readDuration reads a Go duration string such as "2s". A bare number other
// than 0 is an error rather than a guess at its unit.
func readDuration(n *yaml.Node) (time.Duration, error) {
	s, err := readString(n)
	if err != nil {
		return 0, err
	}
	d, err := time.ParseDuration(s)
	if err == nil {
		return d, nil
	}
	if strings.ContainsAny(s, "0123456789") && strings.Trim(s, "+-.0123456789") == "" {
		return 0, fmt.Errorf("%s has no unit; write a duration such as %q", s, s+"s")
	}
	return 0, fmt.Errorf(`%q is not a duration; write e.g. "500ms", "2s", "15m" or "1h30m"`, s)
}

// readFileMode reads permission bits in octal, as chmod takes them. The
// quotes are optional: "0660", 0660, 660 and 0o660 are the same mode (yaml.v3
// reads an unquoted 0660 as the number 432; the text is what counts here).
func readFileMode(n *yaml.Node) (fs.FileMode, error) {
	s, err := readString(n)
	if err != nil {
		return 0, err
	}
	m, err := strconv.ParseUint(strings.TrimPrefix(s, "0o"), 8, 32)
	if err != nil {
		return 0, fmt.Errorf(`must be an octal file mode such as "0660", not %q`, s)
	}
	return fs.FileMode(m), nil
}

var logLevels = map[string]slog.Level{
	"debug": slog.LevelDebug,
	"info":  slog.LevelInfo,
	"warn":  slog.LevelWarn,
	"error": slog.LevelError,
}

func readLevel(n *yaml.Node) (slog.Level, error) {
	s, err := readString(n)
	if err != nil {
		return 0, err
	}
	l, ok := logLevels[s]
	if !ok {
		return 0, fmt.Errorf("must be debug, info, warn or error, not %q", s)
	}
	return l, nil
}

// withDefaultPort returns a bare IP address as "ip:53" and anything else
// unchanged, for Validate to judge.
func withDefaultPort(s string) string {
	ip := s
	if strings.HasPrefix(s, "[") && strings.HasSuffix(s, "]") {
		ip = s[1 : len(s)-1]
	}
	a, err := netip.ParseAddr(ip)
	if err != nil {
		return s
	}
	return netip.AddrPortFrom(a, 53).String()
}

// keyRef is one key of the document (or one list item), with its key path.
type keyRef struct {
	path   string // "dns.timeout", "maps.postfix", "listen[1]"
	parent string // "dns", "maps", "listen"; "" at the top
	key    *yaml.Node
	value  *yaml.Node // the same as key for a list item
}

// keyIndex lists a document's keys in document order.
type keyIndex []keyRef

// locate appends the keys under n to ks. It does not follow aliases, so a
// key under an anchor is found only where the anchor is.
func locate(n *yaml.Node, prefix string, ks keyIndex) keyIndex {
	switch n.Kind {
	case yaml.DocumentNode:
		for _, c := range n.Content {
			ks = locate(c, prefix, ks)
		}
	case yaml.MappingNode:
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			path := k.Value
			if prefix != "" {
				path = prefix + "." + k.Value
			}
			ks = append(ks, keyRef{path: path, parent: prefix, key: k, value: v})
			ks = locate(v, path, ks)
		}
	case yaml.SequenceNode:
		for i, v := range n.Content {
			path := fmt.Sprintf("%s[%d]", prefix, i)
			ks = append(ks, keyRef{path: path, parent: prefix, key: v, value: v})
			ks = locate(v, path, ks)
		}
	}
	return ks
}

// line returns the line of the first of paths present in the document,
// else that of the nearest enclosing key of paths[0], else 0.
func (ks keyIndex) line(paths []string) int {
	for _, p := range paths {
		for _, k := range ks {
			if k.path == p {
				return k.key.Line
			}
		}
	}
	if len(paths) == 0 {
		return 0
	}
	for p := paths[0]; ; {
		i := strings.LastIndexAny(p, ".[")
		if i < 0 {
			return 0
		}
		p = p[:i]
		for _, k := range ks {
			if k.path == p {
				return k.key.Line
			}
		}
	}
}

// find returns the first key that matches, or nil.
func (ks keyIndex) find(match func(k *keyRef) bool) *keyRef {
	for i := range ks {
		if match(&ks[i]) {
			return &ks[i]
		}
	}
	return nil
}

// The messages of yaml.v3 (frozen at v3.0.1) that typeError and syntaxError
// rewrite.
var (
	unknownKeyRE  = regexp.MustCompile(`^line (\d+): field (.*) not found in type (\S+)$`)
	repeatedKeyRE = regexp.MustCompile(`^line (\d+): mapping key (".*") already defined at line (\d+)$`)
	wrongKindRE   = regexp.MustCompile(`(?s)^line (\d+): cannot unmarshal !(!?\w*).* into (\S+)$`)
	lineRE        = regexp.MustCompile(`(?s)^(?:yaml: )?line (\d+): (.*)$`)
)

// typeError rewrites one message of a yaml.TypeError into a configError that
// names the key path.
func typeError(msg string, ks keyIndex) *configError {
	if m := unknownKeyRE.FindStringSubmatch(msg); m != nil {
		line, name := atoi(m[1]), m[2]
		e := &configError{line: line, msg: fmt.Sprintf("unknown key %q", name)}
		if k := ks.find(func(k *keyRef) bool { return k.key.Line == line && k.key.Value == name }); k != nil && k.parent != "" {
			e.msg += " in " + k.parent
		}
		if known := keysOf(m[3]); known != nil {
			e.msg += "; known keys: " + strings.Join(known, ", ")
		}
		return e
	}
	if m := repeatedKeyRE.FindStringSubmatch(msg); m != nil {
		line, first := atoi(m[1]), m[3]
		name, _ := strconv.Unquote(m[2])
		e := &configError{line: line, msg: fmt.Sprintf("key %q repeated; first set at line %s", name, first)}
		if k := ks.find(func(k *keyRef) bool { return k.key.Line == line && k.key.Value == name }); k != nil {
			e.path, e.msg = k.path, "repeated; first set at line "+first
		}
		return e
	}
	if m := wrongKindRE.FindStringSubmatch(msg); m != nil {
		line, target := atoi(m[1]), m[3]
		if target == "string" { // a map key that is a list or a mapping
			return &configError{line: line, path: "maps", msg: "a map name must be a plain string"}
		}
		e := &configError{line: line, msg: "must be a mapping"}
		if known := keysOf(target); known != nil {
			e.msg += " with the keys " + strings.Join(known, ", ")
		}
		isWrongValue := func(k *keyRef) bool {
			return k.key != k.value && k.value.Line == line && deref(k.value).Kind != yaml.MappingNode
		}
		if target == reflect.TypeFor[yamlConfig]().String() {
			e.msg = "the file " + e.msg
		} else if k := ks.find(isWrongValue); k != nil {
			e.path = k.path
		}
		return e
	}
	return syntaxError(errors.New(msg))
}

// syntaxError rewrites an error of yaml.v3 that is not about one key.
func syntaxError(err error) *configError {
	msg := escapeControl(err.Error())
	if m := lineRE.FindStringSubmatch(msg); m != nil {
		return &configError{line: atoi(m[1]), msg: "invalid YAML: " + m[2]}
	}
	return &configError{msg: "invalid YAML: " + strings.TrimPrefix(msg, "yaml: ")}
}

// escapeControl writes the control characters of s as Go escapes: a
// message of yaml.v3 may repeat a tag of the file that holds a newline, and
// an error has one line per problem.
func escapeControl(s string) string {
	if strings.IndexFunc(s, unicode.IsControl) < 0 {
		return s
	}
	var b strings.Builder
	for _, r := range s {
		if unicode.IsControl(r) {
			q := strconv.QuoteRune(r)
			b.WriteString(q[1 : len(q)-1])
		} else {
			b.WriteRune(r)
		}
	}
	return b.String()
}

func atoi(s string) int {
	n, _ := strconv.Atoi(s)
	return n
}

// keysOf returns the keys allowed in the mapping that yaml.v3 decodes into
// the Go type named typeName (as its errors name it), or nil.
func keysOf(typeName string) []string {
	var find func(t reflect.Type) []string
	find = func(t reflect.Type) []string {
		if t.Kind() == reflect.Map {
			t = t.Elem()
		}
		if t.Kind() != reflect.Struct || t == reflect.TypeFor[yaml.Node]() {
			return nil
		}
		var names []string
		for f := range t.Fields() {
			name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
			names = append(names, name)
		}
		if t.String() == typeName {
			return names
		}
		for f := range t.Fields() {
			if names := find(f.Type); names != nil {
				return names
			}
		}
		return nil
	}
	return find(reflect.TypeFor[yamlConfig]())
}
