package main

import (
	"database/sql"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"log"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"

	"go.mongodb.org/mongo-driver/x/bsonx/bsoncore"
	_ "modernc.org/sqlite" // the driver FerretDB itself uses, registered as "sqlite"
)

// FerretDB v1.24's SQLite backend keeps each collection in a table with one JSON
// column and creates the _id index on the expression _ferretdb_sjson->"_id",
// but it looks documents up with _ferretdb_sjson->'$._id' (metadata.IDColumn):
// in Query, and in the UPDATE and DELETE statements every update, findAndModify
// and delete ends with. SQLite uses an expression index only for the very same
// expression, so each of those scanned the whole table. The harness adds to each
// collection table an index on the expression FerretDB queries with.
//
// The harness's patch (patches/sqlite-pushdown.patch, pushdown.go) also narrows
// a query by an equality, a range or a literal prefix on any other top-level
// field, with the expression _ferretdb_sjson->>'$.field', and reads a sort that
// ends on _id off an index once it has checked, through indexes on the types
// sjson records, that every _id is an ObjectID and every other key one type. So for each index the service creates (createIndexes) on top-level
// fields, the harness adds one on those fields' lookup expressions, in the same
// order: {role: 1, _id: 1} becomes (_ferretdb_sjson->>'$.role', _ferretdb_sjson->'$._id'),
// which serves a filtered keyset page (role = ? AND _id > ? ORDER BY _id).
const (
	idLookupExpression = `_ferretdb_sjson->'$._id'`
	// The type sjson records for each _id, beside the document (pushdown.go's IDTypeColumn).
	idTypeExpression = `_ferretdb_sjson->>'$."$s".p._id.t'`
	// FerretDB reserves the _ferretdb_ prefix: no name it gives a table or an
	// index starts with it, so these cannot clash with them.
	idIndexPrefix     = "_ferretdb_id_"
	idTypeIndexPrefix = "_ferretdb_idtype_"
	fieldIndexPrefix  = "_ferretdb_ix_"
	typeIndexPrefix   = "_ferretdb_type_"
	// FerretDB's list of the collections in a database file, with their tables.
	collectionsTable = "_ferretdb_collections"
	fileExtension    = ".sqlite"
)

// plainField is a top-level field name the patch narrows by (pushdown.go's plainField).
var plainField = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// sqlIndex is an index the harness keeps on a collection table.
type sqlIndex struct {
	name    string
	table   string
	columns []string
}

// collectionSettings is the part of FerretDB's settings column that lists a collection's indexes.
type collectionSettings struct {
	Indexes []struct {
		Name string `json:"name"`
		Key  []struct {
			Field string `json:"field"`
		} `json:"key"`
	} `json:"indexes"`
}

// tableIndexes are the indexes the harness keeps on a collection's table, given FerretDB's
// settings for it: the _id lookup, the _id's type, and one on the lookup expressions of each
// index FerretDB made on top-level fields only (other than _id alone).
func tableIndexes(table, settings string) []sqlIndex {
	indexes := []sqlIndex{
		{idIndexPrefix + table, table, []string{idLookupExpression}},
		{idTypeIndexPrefix + table, table, []string{idTypeExpression}},
	}
	var parsed collectionSettings
	if err := json.Unmarshal([]byte(settings), &parsed); err != nil {
		log.Printf("settings of table %s: %v", table, err)
		return indexes
	}
	typed := map[string]bool{}
	for _, index := range parsed.Indexes {
		columns := make([]string, 0, len(index.Key))
		for _, key := range index.Key {
			if !plainField.MatchString(key.Field) {
				columns = nil
				break
			}
			if key.Field == "_id" {
				columns = append(columns, idLookupExpression)
			} else {
				columns = append(columns, fieldExpression(key.Field))
			}
		}
		if len(columns) == 0 || (len(columns) == 1 && columns[0] == idLookupExpression) {
			continue
		}
		indexes = append(indexes, sqlIndex{fieldIndexPrefix + table + "_" + index.Name, table, columns})
		// An index that ends on _id serves a sorted keyset: the patch sorts by its fields once it
		// has seen, through these, that each holds one type in every row.
		if last := index.Key[len(index.Key)-1].Field; len(index.Key) > 1 && last == "_id" {
			for _, key := range index.Key[:len(index.Key)-1] {
				name := typeIndexPrefix + table + "_" + key.Field
				if !typed[name] {
					typed[name] = true
					indexes = append(indexes, sqlIndex{name, table, []string{typeExpression(key.Field)}})
				}
			}
		}
	}
	return indexes
}

// typeExpression is the BSON type sjson records for a top-level field (pushdown.go's typeColumn).
func typeExpression(field string) string {
	return `_ferretdb_sjson->>'$."$s".p.` + field + `.t'`
}

// fieldExpression is the expression the patch compares a top-level field with (its SQL value;
// _id is compared by its JSON text, idLookupExpression, as FerretDB's own statements do).
func fieldExpression(field string) string {
	return `_ferretdb_sjson->>'$.` + field + `'`
}

// indexNames lists the indexes of a database file.
func indexNames(conn *sql.DB) (map[string]bool, error) {
	rows, err := conn.Query(`SELECT name FROM sqlite_schema WHERE type = 'index'`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	names := map[string]bool{}
	for rows.Next() {
		var name string
		if err := rows.Scan(&name); err != nil {
			return nil, err
		}
		names[name] = true
	}
	return names, rows.Err()
}

// databaseName is what FerretDB accepts as a database name, and so as a file name.
var databaseName = regexp.MustCompile(`^[a-zA-Z0-9_-]{1,63}$`)

// creatingCommands may create the collection they name (FerretDB v1.24 has no $out).
var creatingCommands = map[string]bool{
	"insert": true, "update": true, "findAndModify": true, "findandmodify": true,
	"create": true, "createIndexes": true,
}

// indexer adds the harness's indexes to each collection table FerretDB creates.
//
// It opens the database file with a connection of its own for each check and
// closes it at once, so it never holds a file that FerretDB may drop. It runs
// between commands, under the proxy's lock (and a lock of its own, so that it
// stays safe if commands ever run beside each other); FerretDB's connections
// use WAL and wait for locks, so its open cursors do not get in the way.
type indexer struct {
	mu  sync.Mutex
	dir string
	// known records, per database, the collections found indexed (true) or found
	// missing (false); it is reset where a command drops or renames collections.
	known map[string]map[string]bool
}

func newIndexer(dir string) *indexer {
	return &indexer{dir: dir, known: map[string]map[string]bool{}}
}

// indexExisting indexes every database file already in the directory.
func (ix *indexer) indexExisting() {
	files, err := filepath.Glob(filepath.Join(ix.dir, "*"+fileExtension))
	if err != nil {
		log.Print(err)
		return
	}
	for _, file := range files {
		name := strings.TrimSuffix(filepath.Base(file), fileExtension)
		if databaseName.MatchString(name) {
			ix.index(name, "")
		}
	}
}

// after runs once FerretDB has answered cmd.
func (ix *indexer) after(cmd command) {
	ix.mu.Lock()
	defer ix.mu.Unlock()
	switch cmd.name {
	case "drop":
		delete(ix.known[cmd.db], cmd.collection)
		return
	case "dropDatabase":
		delete(ix.known, cmd.db)
		return
	case "renameCollection":
		clear(ix.known)
		return
	}
	if cmd.collection == "" || !databaseName.MatchString(cmd.db) {
		return
	}
	indexed, seen := ix.known[cmd.db][cmd.collection]
	// A new index of the service's gets its lookup index at once.
	if cmd.name != "createIndexes" && (indexed || (seen && !creatingCommands[cmd.name])) {
		return
	}
	ix.index(cmd.db, cmd.collection)
}

// index adds the missing indexes to the tables of database db, and records what
// it found, including whether the collection named (if any) exists.
func (ix *indexer) index(db, collection string) {
	collections, err := ix.indexDatabase(db)
	if err != nil {
		log.Printf("indexing database %s: %v", db, err)
		return
	}
	known := map[string]bool{}
	for _, name := range collections {
		known[name] = true
	}
	if collection != "" && !known[collection] {
		known[collection] = false
	}
	ix.known[db] = known
}

// indexDatabase indexes every collection table of database db that lacks the
// index, and returns the names of its collections.
func (ix *indexer) indexDatabase(db string) ([]string, error) {
	path := filepath.Join(ix.dir, db+fileExtension)
	if _, err := os.Stat(path); err != nil {
		return nil, nil // FerretDB has not created this database
	}
	// mode=rw: never create a file FerretDB would then take for a database.
	dsn := (&url.URL{Scheme: "file", Path: path, RawQuery: "mode=rw&_pragma=busy_timeout(10000)"}).String()
	conn, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	conn.SetMaxOpenConns(1)

	existing, err := indexNames(conn)
	if err != nil {
		return nil, err
	}
	rows, err := conn.Query(fmt.Sprintf(`SELECT name, table_name, settings FROM %s`, quote(collectionsTable)))
	if err != nil {
		return nil, err
	}
	var collections []string
	var missing []sqlIndex
	for rows.Next() {
		var name, table, settings string
		if err := rows.Scan(&name, &table, &settings); err != nil {
			rows.Close()
			return nil, err
		}
		collections = append(collections, name)
		for _, index := range tableIndexes(table, settings) {
			if !existing[index.name] {
				missing = append(missing, index)
			}
		}
	}
	if err := rows.Close(); err != nil {
		return nil, err
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	for _, index := range missing {
		// Not UNIQUE: FerretDB's own indexes already refuse duplicates, with the errors FerretDB
		// knows how to report.
		q := fmt.Sprintf(`CREATE INDEX IF NOT EXISTS %s ON %s (%s)`,
			quote(index.name), quote(index.table), strings.Join(index.columns, ", "))
		if _, err := conn.Exec(q); err != nil {
			return nil, err
		}
	}
	return collections, nil
}

// quote makes name an SQL identifier.
func quote(name string) string {
	return `"` + strings.ReplaceAll(name, `"`, `""`) + `"`
}

// command is what the harness needs to know of a client's request.
type command struct {
	name       string // the body's first key, such as "find"
	collection string // its value when a string: the collection most commands act on
	db         string // the body's $db
}

const checksumPresentBit = 1 << 0

// parseCommand reads the command of an OP_MSG; anything else gives the zero command.
func parseCommand(message []byte) command {
	if len(message) < headerSize+4 || binary.LittleEndian.Uint32(message[12:16]) != opMsg {
		return command{}
	}
	sections := message[headerSize+4:]
	if binary.LittleEndian.Uint32(message[16:20])&checksumPresentBit != 0 {
		if len(sections) < 4 {
			return command{}
		}
		sections = sections[:len(sections)-4]
	}
	for len(sections) > 0 {
		kind := sections[0]
		sections = sections[1:]
		switch kind {
		case 0: // the body
			body, _, ok := bsoncore.ReadDocument(sections)
			if !ok {
				return command{}
			}
			first, err := body.IndexErr(0)
			if err != nil {
				return command{}
			}
			var cmd command
			cmd.name = first.Key()
			cmd.collection, _ = first.Value().StringValueOK()
			if db, err := body.LookupErr("$db"); err == nil {
				cmd.db, _ = db.StringValueOK()
			}
			return cmd
		case 1: // a document sequence: its size, then the rest
			if len(sections) < 4 {
				return command{}
			}
			size := int(binary.LittleEndian.Uint32(sections[:4]))
			if size < 4 || size > len(sections) {
				return command{}
			}
			sections = sections[size:]
		default:
			return command{}
		}
	}
	return command{}
}
